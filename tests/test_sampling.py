"""Tests of the DP batch samplers: distributions checked against closed-form binomial oracles."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from vaultgemma_hf.dp.sampling import (
    PAD_INDEX,
    DPBatchSampler,
    fresh_generator,
    poisson_sample,
    sampling_rate,
    split_evenly,
    steps_per_epoch,
)
from vaultgemma_hf.trainer.batching import EXAMPLE_MASK_KEY, MaskedCollator, MaskedDataset


def _binomial_pmf(n: int, p: float, k: int) -> float:
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


def _logical_batches(sampler: DPBatchSampler, steps: int) -> list[list[list[int]]]:
    """Groups the micro-batches of `steps` logical steps (several epochs if needed)."""
    k = sampler.micro_batches_per_step
    out = []
    while len(out) < steps:
        micro = list(sampler)
        out.extend(micro[i : i + k] for i in range(0, len(micro), k))
    return out[:steps]


def test_sampling_rate_and_epoch_length():
    assert sampling_rate(100, 10) == 0.1
    assert steps_per_epoch(100, 10, "poisson") == 10
    assert steps_per_epoch(101, 10, "poisson") == 11
    assert steps_per_epoch(101, 10, "shuffle") == 10
    with pytest.raises(ValueError, match="empty"):
        sampling_rate(0, 1)
    with pytest.raises(ValueError, match="exceeds"):
        sampling_rate(5, 6)


def test_split_evenly():
    assert split_evenly([1, 2, 3, 4, 5], 3) == [[1, 2], [3, 4], [5]]
    assert split_evenly([1], 3) == [[1], [], []]
    assert split_evenly([], 2) == [[], []]


def test_fresh_generator_is_random_unless_seeded():
    a, b = fresh_generator(), fresh_generator()
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    c, d = fresh_generator(3), fresh_generator(3)
    assert torch.equal(torch.rand(8, generator=c), torch.rand(8, generator=d))


def test_poisson_sample_marginals_and_batch_size_distribution():
    n, q, draws = 20, 0.15, 4000
    gen = fresh_generator(0)
    counts = torch.zeros(n)
    sizes = []
    pair = 0
    for _ in range(draws):
        idx = poisson_sample(n, q, gen)
        assert len(set(idx.tolist())) == idx.numel()  # no repeats
        counts[idx] += 1
        sizes.append(idx.numel())
        pair += int(0 in idx.tolist() and 1 in idx.tolist())
    # every unit included with probability q (4.5 sigma band of a binomial frequency)
    tol = 4.5 * math.sqrt(q * (1 - q) / draws)
    assert torch.all((counts / draws - q).abs() < tol)
    # batch size ~ Binomial(n, q): empty-batch frequency and mean against the closed form
    p_empty = _binomial_pmf(n, q, 0)
    freq_empty = sum(s == 0 for s in sizes) / draws
    assert abs(freq_empty - p_empty) < 4.5 * math.sqrt(p_empty * (1 - p_empty) / draws)
    assert abs(sum(sizes) / draws - n * q) < 4.5 * math.sqrt(n * q * (1 - q) / draws)
    # independence of two units: joint inclusion ~ q^2
    assert abs(pair / draws - q * q) < 4.5 * math.sqrt(q * q * (1 - q * q) / draws)


def test_poisson_sampler_yields_k_micro_batches_per_step_and_empty_steps():
    n, batch, k = 12, 1, 3
    sampler = DPBatchSampler(
        n, batch, sampling="poisson", micro_batches_per_step=k, micro_batch_size=2, generator=fresh_generator(1)
    )
    assert len(sampler) == steps_per_epoch(n, batch, "poisson") * k
    micro = list(sampler)
    assert len(micro) == len(sampler)
    steps = [micro[i : i + k] for i in range(0, len(micro), k)]
    sizes = [sum(len(m) for m in step) for step in steps]
    for step in steps:  # near-equal split inside a step
        lengths = [len(m) for m in step]
        assert max(lengths) - min(lengths) <= 1
    many = _logical_batches(sampler, 600)
    empty = sum(sum(len(m) for m in step) == 0 for step in many)
    p_empty = (1 - batch / n) ** n
    assert abs(empty / 600 - p_empty) < 4.5 * math.sqrt(p_empty * (1 - p_empty) / 600)
    assert all(size >= 0 for size in sizes)


@pytest.mark.parametrize("sampling", ["poisson", "truncated_poisson", "shuffle"])
def test_ranks_share_one_global_batch(sampling):
    """Each rank keeps a disjoint slice; the union is the single-process draw with the same seed."""
    n, batch, k, p, world = 30, 6, 2, 3, 3
    kwargs = dict(sampling=sampling, micro_batches_per_step=k, micro_batch_size=p)
    single = DPBatchSampler(n, batch, generator=fresh_generator(7), **kwargs, world_size=1)
    if sampling == "truncated_poisson":
        kwargs["max_batch_size"] = 8
        single = DPBatchSampler(n, batch, generator=fresh_generator(7), **{**kwargs, "micro_batch_size": p * world})
    ranks = [
        DPBatchSampler(n, batch, generator=fresh_generator(7), **kwargs, world_size=world, rank=r)
        for r in range(world)
    ]
    single_steps = _logical_batches(single, 10)
    rank_steps = [_logical_batches(s, 10) for s in ranks]
    for step in range(10):
        expected = sorted(i for m in single_steps[step] for i in m if i != PAD_INDEX)
        parts = [[i for m in rank_steps[r][step] for i in m if i != PAD_INDEX] for r in range(world)]
        union = sorted(i for part in parts for i in part)
        assert union == expected
        assert len(set(union)) == len(union)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
        if sampling == "truncated_poisson":
            assert all(len(m) == p for r in range(world) for m in rank_steps[r][step])
            assert len(union) <= 8


def test_truncated_poisson_inclusion_matches_binomial_oracle():
    """With truncation to M, every unit is kept with probability E[min(B, M)] / N, B ~ Binomial(N, q)."""
    n, batch, cap, draws = 16, 6, 4, 3000
    sampler = DPBatchSampler(
        n,
        batch,
        sampling="truncated_poisson",
        micro_batches_per_step=2,
        micro_batch_size=3,
        max_batch_size=cap,
        generator=fresh_generator(11),
    )
    q = batch / n
    expected_kept = sum(min(b, cap) * _binomial_pmf(n, q, b) for b in range(n + 1))
    counts = torch.zeros(n)
    sizes = []
    for step in _logical_batches(sampler, draws):
        real = [i for m in step for i in m if i != PAD_INDEX]
        assert all(len(m) == 3 for m in step)  # fixed physical shape
        counts[real] += 1
        sizes.append(len(real))
    assert max(sizes) == cap
    assert abs(sum(sizes) / draws - expected_kept) < 0.1
    p_unit = expected_kept / n
    assert torch.all((counts / draws - p_unit).abs() < 4.5 * math.sqrt(p_unit * (1 - p_unit) / draws))


def test_truncated_poisson_cap_validation():
    with pytest.raises(ValueError, match="capacity"):
        DPBatchSampler(
            10,
            2,
            sampling="truncated_poisson",
            micro_batches_per_step=1,
            micro_batch_size=2,
            max_batch_size=3,
            generator=fresh_generator(0),
        )


def test_shuffle_epoch_is_a_partition():
    n, batch = 23, 5
    sampler = DPBatchSampler(
        n, batch, sampling="shuffle", micro_batches_per_step=2, micro_batch_size=5, generator=fresh_generator(2)
    )
    steps = _logical_batches(sampler, steps_per_epoch(n, batch, "shuffle"))
    flat = [i for step in steps for m in step for i in m]
    assert all(sum(len(m) for m in step) == batch for step in steps)
    assert len(flat) == len(set(flat)) == (n // batch) * batch


def test_user_level_sampling_takes_one_sequence_per_sampled_user():
    groups = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    owner = {i: u for u, g in enumerate(groups) for i in g}
    sampler = DPBatchSampler(
        4,
        2,
        sampling="poisson",
        micro_batches_per_step=1,
        micro_batch_size=4,
        generator=fresh_generator(5),
        groups=groups,
    )
    draws = 2000
    user_counts = torch.zeros(4)
    seq_counts = torch.zeros(10)
    for step in _logical_batches(sampler, draws):
        seqs = [i for m in step for i in m]
        users = [owner[i] for i in seqs]
        assert len(users) == len(set(users))  # at most one sequence per user per step
        user_counts[users] += 1
        seq_counts[seqs] += 1
    q = 0.5
    assert torch.all((user_counts / draws - q).abs() < 4.5 * math.sqrt(q * (1 - q) / draws))
    # inside user 0 the sequence is uniform: each of its 3 sequences ~ q / 3
    p = q / 3
    assert torch.all((seq_counts[:3] / draws - p).abs() < 4.5 * math.sqrt(p * (1 - p) / draws))


def test_masked_collator_handles_padding_and_empty_micro_batches():
    data = [{"input_ids": torch.arange(4) + i, "labels": torch.arange(4) + i} for i in range(5)]

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    loader = DataLoader(
        MaskedDataset(data), batch_sampler=[[1, PAD_INDEX], [], [3]], collate_fn=MaskedCollator(collate, data[0])
    )
    first, empty, last = list(loader)
    assert first[EXAMPLE_MASK_KEY].tolist() == [True, False]
    assert torch.equal(first["input_ids"][0], data[1]["input_ids"])
    assert empty["input_ids"].shape == (0, 4) and empty[EXAMPLE_MASK_KEY].shape == (0,)
    assert last[EXAMPLE_MASK_KEY].tolist() == [True]


def test_shuffle_iterations_must_be_whole_epochs():
    """Each iteration draws a fresh permutation; shorter iterations reuse units within one accounted epoch."""
    from vaultgemma_hf.dp.accounting import shuffle_epochs

    kwargs = dict(sampling="shuffle", micro_batches_per_step=1, micro_batch_size=2)
    # N = 10, L = 2: the accountant counts ceil(T / 5) epochs, so 4 steps are one Gaussian per unit.
    assert shuffle_epochs(4, 10, 2) == 1
    with pytest.raises(ValueError, match="num_steps"):
        DPBatchSampler(10, 2, generator=torch.Generator().manual_seed(0), num_steps=2, **kwargs)
    sampler = DPBatchSampler(10, 2, generator=torch.Generator().manual_seed(0), **kwargs)
    used = [unit for batch in list(sampler)[:4] for unit in batch]
    assert len(used) == len(set(used))  # within an epoch every unit is used at most once
