"""Batch sampling for DP-SGD: Poisson, truncated Poisson and (opt-in) shuffled fixed-size batches.

The privacy analysis of DP-SGD depends on *how* each logical batch is drawn, so the sampler and the accountant
must agree:

* ``"poisson"``: every privacy unit is included independently with probability ``q = logical_batch_size / N``
  at every logical step. The batch size is random (Binomial(N, q)) and may be 0: the step still happens (noise
  only). Accounted as `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`.
* ``"truncated_poisson"``: Poisson as above, then, if more than ``max_batch_size`` units were drawn, a uniformly
  random subset of ``max_batch_size`` of them is kept; the rest of the fixed physical batch is padding that is
  masked out. Accounted as `TruncatedSubsampledGaussianDpEvent(N, q, max_batch_size, σ)`.
* ``"shuffle"``: each epoch is a fresh random permutation cut into ``floor(N / L)`` batches of exactly ``L``
  units. This does not get Poisson amplification; the accountant accounts for it separately (opt-in only).

Distributed data parallel: all processes share one sampling seed (broadcast from rank 0 by the trainer), draw the
*same* global batch and each keeps the slice ``batch[rank::world_size]``. The union over processes is therefore
exactly one draw of the scheme above over the whole dataset, which is what the accountant is told; the work is
balanced across processes (sizes differ by at most one).

With ``privacy_unit="user"`` the units are users (``groups[u]`` lists the dataset indices of user ``u``): users
are sampled as above and each sampled user contributes one of their sequences, chosen uniformly at random, so a
user's contribution to a step is a single clipped gradient (sensitivity C).

Randomness comes from a `torch.Generator` seeded with 63 bits of OS entropy ([`fresh_generator`]); only the
explicit testing flag of the trainer seeds it deterministically. Its state is never saved to or restored from a
checkpoint. (Like Opacus outside its "secure mode", the generator itself is a fast PRNG, not a CSPRNG.)
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

#: Dataset index standing for a masked padding slot in a micro-batch.
PAD_INDEX = -1


def fresh_generator(seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` seeded from the OS (`secrets`), or from `seed` when one is given (testing only)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return generator


def sampling_rate(num_units: int, logical_batch_size: int) -> float:
    """Poisson sampling rate ``q = logical_batch_size / num_units``.

    Raises:
        ValueError: for an empty dataset or an expected batch larger than the dataset.
    """
    if num_units < 1:
        raise ValueError("The training dataset is empty: there is nothing to sample from.")
    if logical_batch_size > num_units:
        raise ValueError(
            f"logical_batch_size={logical_batch_size} exceeds the number of privacy units N={num_units}: the "
            "sampling rate q = logical_batch_size / N would be above 1."
        )
    return logical_batch_size / num_units


def steps_per_epoch(num_units: int, logical_batch_size: int, sampling: str) -> int:
    """Logical steps in one epoch: ``ceil(N / L)`` for Poisson schemes, ``floor(N / L)`` for shuffling."""
    sampling_rate(num_units, logical_batch_size)  # validates
    if sampling == "shuffle":
        return num_units // logical_batch_size
    return -(-num_units // logical_batch_size)


def poisson_sample(num_units: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample (each unit independently with probability `rate`), in uniformly random order."""
    included = torch.rand(num_units, generator=generator, dtype=torch.float64) < rate
    indices = included.nonzero().flatten()
    return indices[torch.randperm(indices.numel(), generator=generator)]


def truncate(indices: torch.Tensor, max_size: int) -> torch.Tensor:
    """Keeps at most `max_size` indices; for indices in uniformly random order this is a uniform random subset."""
    return indices[:max_size]


def shuffled_batches(num_units: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of fixed-size batches cut from a random permutation (the last partial batch is dropped)."""
    permutation = torch.randperm(num_units, generator=generator)
    return [permutation[i * batch_size : (i + 1) * batch_size] for i in range(num_units // batch_size)]


def split_evenly(items: Sequence[int], parts: int) -> list[list[int]]:
    """Splits `items` into `parts` contiguous chunks whose sizes differ by at most one (some may be empty)."""
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


class DPBatchSampler(Sampler[list[int]]):
    """Batch sampler yielding the micro-batches of DP-SGD logical steps for one process.

    Each logical step yields exactly `micro_batches_per_step` lists of dataset indices (the HF
    `gradient_accumulation_steps`), possibly empty; for ``"truncated_poisson"`` every list has exactly
    `micro_batch_size` entries, padded with [`PAD_INDEX`]. One iteration is one epoch of `num_steps` logical steps.

    Args:
        num_units (`int`): N, the number of privacy units (sequences, or users when `groups` is given).
        logical_batch_size (`int`): L, the expected number of units per logical step.
        sampling (`str`): ``"poisson"``, ``"truncated_poisson"`` or ``"shuffle"``.
        micro_batches_per_step (`int`): micro-batches per logical step on each process.
        micro_batch_size (`int`): physical micro-batch size (used for the fixed shapes of truncated Poisson).
        generator (`torch.Generator`): source of randomness; must be identical on all processes.
        max_batch_size (`int`, *optional*): truncated Poisson cap for all processes together. Defaults to, and may
            not exceed, ``micro_batches_per_step * micro_batch_size * world_size``.
        num_steps (`int`, *optional*): logical steps per epoch; defaults to [`steps_per_epoch`].
        world_size (`int`): number of data-parallel processes.
        rank (`int`): this process.
        groups (`Sequence[Sequence[int]]`, *optional*): user-level DP: the dataset indices of each user.
    """

    def __init__(
        self,
        num_units: int,
        logical_batch_size: int,
        *,
        sampling: str,
        micro_batches_per_step: int,
        micro_batch_size: int,
        generator: torch.Generator,
        max_batch_size: int | None = None,
        num_steps: int | None = None,
        world_size: int = 1,
        rank: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if sampling not in ("poisson", "truncated_poisson", "shuffle"):
            raise ValueError(f"Unknown sampling scheme {sampling!r}.")
        if micro_batches_per_step < 1 or micro_batch_size < 1:
            raise ValueError("micro_batches_per_step and micro_batch_size must be >= 1.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        if groups is not None:
            if len(groups) != num_units:
                raise ValueError(f"{len(groups)} user groups given for {num_units} privacy units.")
            if any(len(group) == 0 for group in groups):
                raise ValueError("Every user must own at least one sequence.")
            if sampling == "shuffle":
                raise ValueError("User-level sampling needs Poisson sampling.")
        self.rate = sampling_rate(num_units, logical_batch_size)
        self.num_units = num_units
        self.logical_batch_size = logical_batch_size
        self.sampling = sampling
        self.micro_batches_per_step = micro_batches_per_step
        self.micro_batch_size = micro_batch_size
        self.generator = generator
        self.world_size = world_size
        self.rank = rank
        self.groups = groups
        self.num_steps = steps_per_epoch(num_units, logical_batch_size, sampling) if num_steps is None else num_steps
        if sampling == "shuffle" and self.num_steps != steps_per_epoch(num_units, logical_batch_size, sampling):
            # Every iteration draws a fresh permutation: shorter iterations would let a unit be used again within
            # what the accountant counts as one epoch of floor(N / L) steps (ε under-reported); longer ones do not
            # exist (a permutation has only floor(N / L) full batches).
            raise ValueError(
                f"sampling='shuffle' needs num_steps = floor(N / L) = "
                f"{steps_per_epoch(num_units, logical_batch_size, sampling)} (one permutation per iteration, as the "
                f"accountant assumes), got {self.num_steps}."
            )
        if self.num_steps < 1:
            raise ValueError(
                f"No full logical batch of {logical_batch_size} fits in {num_units} units (sampling={sampling!r})."
            )
        capacity = micro_batches_per_step * micro_batch_size * world_size
        self.capacity = capacity
        if sampling == "truncated_poisson":
            self.max_batch_size = capacity if max_batch_size is None else int(max_batch_size)
            if not 1 <= self.max_batch_size <= capacity:
                raise ValueError(
                    f"max_physical_batch={self.max_batch_size} must be between 1 and the physical capacity of a "
                    f"logical step, per_device_train_batch_size * gradient_accumulation_steps * world_size = "
                    f"{micro_batch_size} * {micro_batches_per_step} * {world_size} = {capacity}."
                )
        elif max_batch_size is not None:
            raise ValueError("max_batch_size only applies to truncated Poisson sampling.")
        else:
            self.max_batch_size = None

    def __len__(self) -> int:
        return self.num_steps * self.micro_batches_per_step

    def _units_to_indices(self, units: torch.Tensor) -> list[int]:
        if self.groups is None:
            return units.tolist()
        picks = []
        for unit in units.tolist():
            group = self.groups[unit]
            picks.append(int(group[int(torch.randint(len(group), (1,), generator=self.generator))]))
        return picks

    def draw_global_batch(self) -> list[int]:
        """Draws one Poisson / truncated Poisson logical batch of dataset indices for all processes."""
        units = poisson_sample(self.num_units, self.rate, self.generator)
        if self.sampling == "truncated_poisson":
            units = truncate(units, self.max_batch_size)
        return self._units_to_indices(units)

    def _micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        if self.sampling == "truncated_poisson":
            padded = global_batch + [PAD_INDEX] * (self.capacity - len(global_batch))
            mine = padded[self.rank :: self.world_size]
            size = self.micro_batch_size
            return [mine[i * size : (i + 1) * size] for i in range(self.micro_batches_per_step)]
        return split_evenly(global_batch[self.rank :: self.world_size], self.micro_batches_per_step)

    def __iter__(self) -> Iterator[list[int]]:
        if self.sampling == "shuffle":
            batches = shuffled_batches(self.num_units, self.logical_batch_size, self.generator)
            for step in range(self.num_steps):
                yield from self._micro_batches(batches[step].tolist())
            return
        for _ in range(self.num_steps):
            yield from self._micro_batches(self.draw_global_batch())
