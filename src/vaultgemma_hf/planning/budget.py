"""Pure budget arithmetic of the planner: compute law, budget conversions, the (B, T) grid, frontier, choice.

The DP scaling law (McKenna et al. 2025, "Scaling Laws for Differentially Private Language Models") says that
for a fixed model the loss is driven by the number of steps T and the noise-batch ratio σ̄ = σ / B (the noise
standard deviation on the *mean* clipped gradient, in units of the clipping norm), and that training costs
C ≈ 6 · M · B · S · T FLOPs (M parameters, B sequences of S tokens per step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from vaultgemma_hf.planning.model_size import VAULTGEMMA_1B_PARAMETERS

FLOPS_PER_PARAMETER_TOKEN = 6
"""Forward + backward FLOPs per parameter and token (the 6 of C ≈ 6·M·B·S·T)."""

ANCHOR_STEP_TOKENS = 4 * 1024
ANCHOR_STEP_SECONDS = 0.162
DEFAULT_THROUGHPUT = ANCHOR_STEP_TOKENS / ANCHOR_STEP_SECONDS
"""≈ 25,284 tokens/s: the project's benchmark anchor, a *non-private* training step of VaultGemma 1B on one
H100 (batch 4 x 1024 tokens in 0.162 s, fp32 master weights + bf16 autocast, AdamW, all parameters trainable).
A DP-SGD step is slower (its target is <= 1.25x); pass your measured DP throughput for real GPU-hours."""

ANCHOR_FLOPS_PER_SECOND = FLOPS_PER_PARAMETER_TOKEN * VAULTGEMMA_1B_PARAMETERS * DEFAULT_THROUGHPUT
"""≈ 1.58e14 FLOP/s: the anchor's useful FLOP rate, used to scale the default throughput to other model sizes."""

DEFAULT_MIN_STEPS = 1000
DEFAULT_NUM_BATCH_SIZES = 5
DEFAULT_BUDGET_FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def training_flops(num_parameters: int, logical_batch_size: int, seq_len: int, steps: int) -> float:
    """C ≈ 6 · M · B · S · T."""
    return float(FLOPS_PER_PARAMETER_TOKEN) * num_parameters * logical_batch_size * seq_len * steps


def default_throughput(num_parameters: int) -> float:
    """Tokens/s assumed when none is given: the H100 anchor's FLOP rate divided by 6·M."""
    return ANCHOR_FLOPS_PER_SECOND / (FLOPS_PER_PARAMETER_TOKEN * num_parameters)


def flops_budget(
    num_parameters: int,
    *,
    flops: float | None = None,
    tokens: float | None = None,
    gpu_hours: float | None = None,
    throughput: float | None = None,
    dataset_size: int,
    seq_len: int,
) -> tuple[float, str]:
    """Converts the budget (at most one of FLOPs, tokens, GPU-hours) into FLOPs.

    Without a budget, one epoch of the data (``N · S`` tokens) is assumed.

    Returns:
        ``(flops, description)``.

    Raises:
        ValueError: If more than one budget is given or a value is not positive.
    """
    given = {k: v for k, v in (("flops", flops), ("tokens", tokens), ("gpu_hours", gpu_hours)) if v is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one compute budget, got {', '.join(given)}.")
    for name, value in given.items():
        if not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"{name} budget must be a positive number, got {value!r}.")
    per_token = float(FLOPS_PER_PARAMETER_TOKEN) * num_parameters
    if flops is not None:
        return float(flops), "given in FLOPs"
    if tokens is not None:
        return per_token * tokens, f"{tokens:.3g} tokens"
    if gpu_hours is not None:
        rate = throughput if throughput is not None else default_throughput(num_parameters)
        return per_token * gpu_hours * 3600.0 * rate, f"{gpu_hours:.3g} GPU-hours at {rate:,.0f} tokens/s"
    return per_token * dataset_size * seq_len, f"one epoch ({dataset_size * seq_len:.3g} tokens; no budget given)"


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One candidate configuration: logical batch size B and number of steps T."""

    logical_batch_size: int
    steps: int


def sequences_in_budget(budget_flops: float, num_parameters: int, seq_len: int) -> int:
    """How many sequences (B · T summed over steps) the budget pays for."""
    return int(budget_flops // (float(FLOPS_PER_PARAMETER_TOKEN) * num_parameters * seq_len))


def default_batch_sizes(
    dataset_size: int, total_sequences: int, min_steps: int, count: int = DEFAULT_NUM_BATCH_SIZES
) -> list[int]:
    """Powers of two centred on B*, the largest one that still allows ``min_steps`` steps within the budget.

    ``count`` sizes B*·2^k (k = -2..2 for 5), kept within [1, N] and affording at least one step; shifted to
    the other side where a limit cuts them.
    """
    if total_sequences < 1:
        return []
    cap = min(dataset_size, total_sequences)  # B <= N and at least one step
    best = 1
    while best * 2 <= cap and best * 2 * min_steps <= total_sequences:
        best *= 2
    top = int(math.log2(cap))  # largest usable exponent
    start = min(max(int(math.log2(best)) - count // 2, 0), max(top - count + 1, 0))
    return [2**e for e in range(start, min(start + count, top + 1))]


def build_grid(
    dataset_size: int,
    total_sequences: int,
    *,
    min_steps: int = DEFAULT_MIN_STEPS,
    batch_sizes: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    budget_fractions: Sequence[float] = DEFAULT_BUDGET_FRACTIONS,
) -> tuple[list[GridPoint], list[str]]:
    """The (B, T) configurations to calibrate, all within the budget of ``total_sequences`` sequences.

    Without ``steps``, each batch size gets T = fraction · (total_sequences // B) for each budget fraction
    (full budget, half, ...). With ``steps``, the product of batch sizes and steps, keeping pairs in budget.

    Returns:
        ``(points, notes)``: points sorted by batch size then steps (descending); notes explain dropped ones.

    Raises:
        ValueError: On invalid batch sizes or step counts.
    """
    notes: list[str] = []
    if batch_sizes is None:
        batch_sizes = default_batch_sizes(dataset_size, total_sequences, min_steps)
    else:
        for size in batch_sizes:
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"batch sizes must be positive integers, got {size!r}.")
            if size > dataset_size:
                raise ValueError(f"batch size {size} exceeds the dataset size {dataset_size} (sampling rate > 1).")
    if steps is not None:
        for count in steps:
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"step counts must be positive integers, got {count!r}.")
    points: set[GridPoint] = set()
    dropped = 0
    for size in sorted(set(batch_sizes)):
        full = total_sequences // size
        if steps is None:
            candidates = {int(full * fraction) for fraction in budget_fractions}
        else:
            candidates = set(steps)
            dropped += sum(1 for count in candidates if count > full)
        points.update(GridPoint(size, count) for count in candidates if 1 <= count <= full)
    if dropped:
        notes.append(f"{dropped} (batch size, steps) pair(s) exceed the compute budget and were left out.")
    return sorted(points, key=lambda p: (p.logical_batch_size, -p.steps)), notes


def pareto_frontier(steps: Sequence[int], ratios: Sequence[float | None]) -> list[bool]:
    """Rows not dominated in (more steps, lower σ̄); rows without a ratio (unreachable) are never on it."""
    flags = []
    for i, (t_i, r_i) in enumerate(zip(steps, ratios)):
        if r_i is None:
            flags.append(False)
            continue
        dominated = any(
            r_j is not None and t_j >= t_i and r_j <= r_i and (t_j > t_i or r_j < r_i)
            for j, (t_j, r_j) in enumerate(zip(steps, ratios))
            if j != i
        )
        flags.append(not dominated)
    return flags


def recommend(steps: Sequence[int], ratios: Sequence[float | None], on_frontier: Sequence[bool], min_steps: int):
    """The heuristic choice: the frontier row with the lowest σ̄ among those with T >= ``min_steps``.

    Returns:
        ``(index, reached_min_steps)``; when no row reaches ``min_steps`` the frontier row with the most steps is
        returned with ``False``; ``(None, False)`` when no row is feasible.
    """
    frontier = [i for i, flag in enumerate(on_frontier) if flag]
    if not frontier:
        return None, False
    eligible = [i for i in frontier if steps[i] >= min_steps]
    if eligible:
        return min(eligible, key=lambda i: (ratios[i], -steps[i])), True
    return max(frontier, key=lambda i: (steps[i], -ratios[i])), False
