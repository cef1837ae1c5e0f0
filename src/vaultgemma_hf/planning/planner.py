"""The DP budget planner: calibrates σ for a grid of (B, T) within a compute budget and recommends one.

Every σ comes from :func:`vaultgemma_hf.dp.accounting.calibrate_noise` (PLD, Poisson sampling) and every ε
reported is a `dp_accounting` PLD value (pessimistic discretisation, so an upper bound on the true ε) at the
row's ``pld_discretization``. Speed comes from four things:

- the plan's precision: rows are calibrated at :data:`PLANNER_PLD_DISCRETIZATION` (10x coarser than the
  trainer's, so each PLD is ~8x cheaper), within half the tolerance; a row is refined to the trainer's precision
  when its ε at three times that interval differs by more than the tolerance (the gap to the trainer's ε then
  may exceed half the tolerance; PLD connect-the-dots errors shrink like the square of the interval, so an
  accepted row's trainer ε is within the tolerance of the target, checked by ``benchmarks/planner.py``). Where
  ε is numerically noisy (:func:`~vaultgemma_hf.dp.accounting.pld_precision_warning`) the check is made at the
  trainer's precision instead, and such rows always report the trainer's ε;
- the calibration itself (few final-precision PLD evaluations, coarse PLDs to predict);
- warm starts between neighbouring rows;
- running the rows of different batch sizes in parallel processes.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from vaultgemma_hf.dp.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    MAX_NOISE_MULTIPLIER,
    NoiseCalibration,
    UnreachableEpsilonError,
    approximate_noise_multiplier,
    calibrate_noise,
    compute_epsilon,
    default_delta,
    dp_accounting_version,
    pld_precision_warning,
)
from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.planning import budget as _budget
from vaultgemma_hf.planning.model_size import VAULTGEMMA_1B_PARAMETERS

PLAN_FORMAT = "vaultgemma-hf-plan"
PLAN_FORMAT_VERSION = 1
CALIBRATION_CHAINS = 2
"""Rows are calibrated in this many warm-started chains of equal estimated cost (one per core of the 2-core
target machine; more workers do not help). Fixed, so that results do not depend on the number of workers."""
PLANNER_PLD_DISCRETIZATION = 1e-3
"""PLD value discretisation interval of the plan's ε (the trainer reports at ``DEFAULT_PLD_DISCRETIZATION``)."""


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One configuration of the plan.

    ``noise_multiplier``, ``noise_batch_ratio`` and ``epsilon`` are None when the target is unreachable for
    this row (``status == "unreachable"``; ``note`` says why).
    """

    logical_batch_size: int
    steps: int
    noise_multiplier: float | None
    noise_batch_ratio: float | None
    epsilon: float | None
    delta: float
    sampling_rate: float
    epochs: float
    tokens: int
    flops: float
    gpu_hours: float
    budget_fraction: float
    on_frontier: bool = False
    status: str = "ok"
    note: str = ""
    pld_discretization: float | None = None


@dataclasses.dataclass
class Plan:
    """A complete plan: inputs, rows, frontier, recommendation and its explanation."""

    target_epsilon: float
    target_delta: float
    dataset_size: int
    seq_len: int
    num_parameters: int
    flops_budget: float
    budget_description: str
    throughput: float
    throughput_source: str
    min_steps: int
    tolerance: float
    rows: list[PlanRow]
    recommended: int | None
    explanation: str
    warnings: list[str]
    calibration_seconds: float
    pld_discretization: float = PLANNER_PLD_DISCRETIZATION
    sampling: str = "poisson"
    accountant: str = "pld"
    dp_accounting_version: str = dataclasses.field(default_factory=dp_accounting_version)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``--json`` file)."""
        data = dataclasses.asdict(self)
        return {"format": PLAN_FORMAT, "format_version": PLAN_FORMAT_VERSION, **data}

    @property
    def recommended_row(self) -> PlanRow | None:
        return None if self.recommended is None else self.rows[self.recommended]


# ----------------------------------------------------------------------------------------------------------------
# Calibration of the grid
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
    index: int
    logical_batch_size: int
    steps: int


def _calibrate_row(
    target_epsilon: float,
    rate: float,
    task: _Task,
    delta: float,
    dataset_size: int,
    tolerance: float,
    discretization: float,
    guess: float | None,
    slope: float | None,
) -> tuple[NoiseCalibration, str]:
    """Calibrates one row at ``discretization`` (refining to the trainer's precision when needed).

    Above the trainer's precision (:data:`DEFAULT_PLD_DISCRETIZATION`) the row is calibrated to half the
    tolerance, then checked against a second PLD at the same σ: at three times the interval (which bounds the
    discretisation gap) in the smooth regime, or at the trainer's precision itself where
    :func:`pld_precision_warning` says ε is numerically noisy (there no interval predicts another, so the plan's ε
    must be the trainer's). If the check moves ε by more than ``tolerance`` (relative to the target) or, for the
    trainer's precision, out of the accepted window, the row is calibrated again at the trainer's precision.

    Returns:
        ``(calibration, note)``; the note says why a row was refined ("" otherwise).
    """
    kwargs = dict(dataset_size=dataset_size, logical_batch_size=task.logical_batch_size)
    final = discretization <= DEFAULT_PLD_DISCRETIZATION * 1.01  # already the trainer's precision: no check
    calibration = calibrate_noise(
        target_epsilon,
        rate,
        task.steps,
        delta,
        tolerance=tolerance if final else tolerance / 2,
        initial_guess=guess,
        initial_slope=slope,
        pld_discretization=discretization,
        **kwargs,
    )
    if final:
        return calibration, ""
    noisy = pld_precision_warning(delta, task.steps) is not None
    check = DEFAULT_PLD_DISCRETIZATION if noisy else 3 * discretization
    checked = compute_epsilon(
        calibration.noise_multiplier, rate, task.steps, delta, pld_discretization=check, **kwargs
    )
    spread = abs(checked - calibration.epsilon) / target_epsilon
    if noisy and target_epsilon * (1 - tolerance) <= checked <= target_epsilon:
        return dataclasses.replace(calibration, epsilon=checked, pld_discretization=check), ""
    if not noisy and spread <= tolerance:
        return calibration, ""
    refined = calibrate_noise(
        target_epsilon,
        rate,
        task.steps,
        delta,
        tolerance=tolerance,
        initial_guess=calibration.noise_multiplier,
        initial_slope=calibration.slope,
        **kwargs,
    )
    note = (
        f"epsilon changed by {spread:.2%} between PLD discretisations {discretization:g} and {check:g}: calibrated "
        f"at {DEFAULT_PLD_DISCRETIZATION:g}"
    )
    return refined, note


def _calibrate_chain(
    tasks: Sequence[_Task],
    target_epsilon: float,
    delta: float,
    dataset_size: int,
    tolerance: float,
    discretization: float,
) -> list[tuple[int, float | None, float | None, float | None, float | None, str]]:
    """Calibrates rows one after the other, warm-starting each from the rows before it.

    The warm start takes the ratio between the calibrated σ and its Gaussian-DP approximation (extrapolated in
    log T over rows of the same batch size), which varies slowly between neighbours, and the measured slope
    d log ε / d log σ. Runs in a worker process: returns plain tuples
    ``(index, sigma, epsilon, best_epsilon, pld_discretization, note)`` (see :func:`_calibrate_row`); for an
    unreachable row sigma and epsilon are None and best_epsilon is the ε reached at the largest σ tried.
    """
    results = []
    history: list[tuple[float, float, float]] = []  # (q, log T, log(σ / σ_approx)) of the rows done so far
    slope = None
    for task in tasks:
        rate = task.logical_batch_size / dataset_size
        approx = approximate_noise_multiplier(target_epsilon, rate, task.steps, delta)
        guess = None
        if history:
            # The correction to the approximation, extrapolated linearly in log T from the last two rows of the
            # same sampling rate (else taken from the last row).
            same = [h for h in history[-2:] if h[0] == rate]
            log_ratio = history[-1][2]
            if len(same) == 2 and same[0][1] != same[1][1]:
                (_, t0, r0), (_, t1, r1) = same
                log_ratio = r1 + (r1 - r0) * (math.log(task.steps) - t1) / (t1 - t0)
            guess = approx * math.exp(log_ratio)
        try:
            calibration, note = _calibrate_row(
                target_epsilon, rate, task, delta, dataset_size, tolerance, discretization, guess, slope
            )
        except UnreachableEpsilonError as err:
            results.append((task.index, None, None, err.best_epsilon, None, ""))
            continue
        history.append((rate, math.log(task.steps), math.log(calibration.noise_multiplier / approx)))
        slope = calibration.slope
        results.append(
            (task.index, calibration.noise_multiplier, calibration.epsilon, None, calibration.pld_discretization, note)
        )
    return results


def _worker_count(workers: int | None, jobs: int) -> int:
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            workers = os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    return max(1, min(workers, jobs))


def _row_cost(task: _Task, target_epsilon: float, delta: float, dataset_size: int) -> float:
    """Relative cost of calibrating one row: the size of its full-precision PLD (times a compose term in T).

    The size is the number of points dp_accounting's connect-the-dots construction uses for the add and remove
    PLDs of one step, at the σ of the Gaussian-DP approximation; measured here, a full-precision evaluation
    costs about 5 µs per point, more for long compositions.
    """
    from dp_accounting.pld import privacy_loss_mechanism

    rate = task.logical_batch_size / dataset_size
    sigma = max(1.3 * approximate_noise_multiplier(target_epsilon, rate, task.steps, delta), 0.1)
    points = 0.0
    for adjacency in (privacy_loss_mechanism.AdjacencyType.ADD, privacy_loss_mechanism.AdjacencyType.REMOVE):
        loss = privacy_loss_mechanism.GaussianPrivacyLoss(sigma, sampling_prob=rate, adjacency_type=adjacency)
        bounds = loss.connect_dots_bounds()
        points += (bounds.epsilon_upper - bounds.epsilon_lower) / DEFAULT_PLD_DISCRETIZATION
    return (points + 1_000.0) * (1.0 + math.sqrt(task.steps) / 200.0)


def _split_balanced(tasks: list[_Task], costs: list[float], parts: int) -> list[list[_Task]]:
    """Cuts ``tasks`` into ``parts`` contiguous chains of about equal total cost."""
    total, chains, current, done = sum(costs), [], [], 0.0
    for task, cost in zip(tasks, costs):
        boundary = total * (len(chains) + 1) / parts
        if current and len(chains) < parts - 1 and done + cost / 2 > boundary:
            chains.append(current)
            current = []
        current.append(task)
        done += cost
    return [*chains, current]


def calibrate_grid(
    points: Sequence[_budget.GridPoint],
    target_epsilon: float,
    delta: float,
    dataset_size: int,
    *,
    tolerance: float = 0.01,
    workers: int | None = None,
    pld_discretization: float = PLANNER_PLD_DISCRETIZATION,
) -> list[tuple[float | None, ...]]:
    """Calibrates σ (PLD, Poisson) for every grid point.

    The points are ordered so that neighbours are similar (batch sizes ascending, steps alternately descending
    and ascending) and cut into :data:`CALIBRATION_CHAINS` chains of about equal estimated cost; each chain is
    calibrated with warm starts from its previous rows, and the chains run in ``workers`` processes. The chains
    do not depend on ``workers``, so neither do the results.

    Returns:
        One ``(sigma, epsilon, best_epsilon, pld_discretization, note)`` per point, in order; sigma and epsilon
        are None when the target is unreachable, and best_epsilon is then the smallest ε found (else None); note
        says why a row was refined to the trainer's precision (see :func:`_calibrate_row`).
    """
    if not (isinstance(pld_discretization, float) and DEFAULT_PLD_DISCRETIZATION <= pld_discretization <= 0.01):
        raise ValueError(
            f"pld_discretization must be a float in [{DEFAULT_PLD_DISCRETIZATION:g}, 0.01], got {pld_discretization!r}."
        )
    groups: dict[int, list[_Task]] = {}
    for index, point in enumerate(points):
        groups.setdefault(point.logical_batch_size, []).append(_Task(index, point.logical_batch_size, point.steps))
    ordered = [
        task
        for i, size in enumerate(sorted(groups))
        for task in sorted(groups[size], key=lambda t: -t.steps if i % 2 == 0 else t.steps)
    ]
    costs = [_row_cost(task, target_epsilon, delta, dataset_size) for task in ordered]
    chains = _split_balanced(ordered, costs, min(CALIBRATION_CHAINS, len(ordered)))
    n_workers = _worker_count(workers, len(chains))
    args = (target_epsilon, delta, dataset_size, tolerance, pld_discretization)
    if n_workers == 1:
        outputs = [_calibrate_chain(chain, *args) for chain in chains]
    else:
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=context) as pool:
            futures = [pool.submit(_calibrate_chain, chain, *args) for chain in chains]
            outputs = [future.result() for future in futures]
    results: list[tuple[Any, ...]] = [(None, None, None, None, "")] * len(points)
    for output in outputs:
        for index, *result in output:
            results[index] = tuple(result)
    return results


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


def _explain(plan_rows: list[PlanRow], index: int | None, reached: bool, min_steps: int, epsilon: float) -> str:
    """Plain-language reason for the recommendation."""
    if index is None:
        return "No configuration meets the privacy target; see the warnings for the nearest feasible setting."
    row = plan_rows[index]
    text = [
        f"Recommended: logical batch {row.logical_batch_size:,} sequences for {row.steps:,} steps "
        f"(noise multiplier σ = {round_up(row.noise_multiplier)}, noise-batch ratio σ̄ = σ/B = "
        f"{row.noise_batch_ratio:.3g}; ε = {round_up(row.epsilon)} ≤ {epsilon:g}, {row.epochs:.3g} epochs, "
        f"{row.flops:.3g} FLOPs).",
        "Why: for a fixed model the DP scaling law says the loss improves with more steps T and with less noise "
        "on the averaged gradient, σ̄ = σ/B. Within a fixed compute budget these pull apart: a larger batch "
        "averages the noise over more sequences (lower σ̄) but leaves fewer steps.",
    ]
    ok = [r for r in plan_rows if r.noise_batch_ratio is not None]
    smaller = [r for r in ok if r.logical_batch_size < row.logical_batch_size and r.flops >= 0.99 * row.flops]
    larger = [r for r in ok if r.logical_batch_size > row.logical_batch_size and r.flops >= 0.99 * row.flops]
    if smaller:
        alt = max(smaller, key=lambda r: r.logical_batch_size)
        text.append(
            f"Halving the batch instead (B = {alt.logical_batch_size:,}) buys {alt.steps:,} steps but raises σ̄ "
            f"{alt.noise_batch_ratio / row.noise_batch_ratio:.2f}x to {alt.noise_batch_ratio:.3g}."
        )
    if larger:
        alt = min(larger, key=lambda r: r.logical_batch_size)
        text.append(
            f"A larger batch (B = {alt.logical_batch_size:,}) lowers σ̄ {row.noise_batch_ratio / alt.noise_batch_ratio:.2f}x "
            f"to {alt.noise_batch_ratio:.3g} but leaves only {alt.steps:,} steps"
            + (f", below the minimum of {min_steps:,} useful steps." if alt.steps < min_steps else ".")
        )
    if reached:
        text.append(
            f"Rule used: among configurations on the frontier (no other row has both more steps and lower σ̄), "
            f"take the lowest σ̄ with at least {min_steps:,} steps (--min-steps). This is a heuristic: it does not "
            "use the law's fitted loss curves, so confirm with a short pilot run and adjust --min-steps."
        )
    else:
        text.append(
            f"No configuration within the budget reaches {min_steps:,} steps, so the row with the most steps is "
            "shown; a larger compute budget (or a smaller --min-steps) is needed for the usual rule."
        )
    return " ".join(text)


def plan_budget(
    *,
    target_epsilon: float,
    dataset_size: int,
    seq_len: int = 1024,
    target_delta: float | None = None,
    num_parameters: int = VAULTGEMMA_1B_PARAMETERS,
    flops: float | None = None,
    tokens: float | None = None,
    gpu_hours: float | None = None,
    throughput: float | None = None,
    min_steps: int = _budget.DEFAULT_MIN_STEPS,
    batch_sizes: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    tolerance: float = 0.01,
    workers: int | None = None,
    pld_discretization: float = PLANNER_PLD_DISCRETIZATION,
) -> Plan:
    """Plans a DP-SGD run: the σ needed for (ε, δ) for each (B, T) in budget, the frontier and a recommendation.

    Args:
        target_epsilon: ε of the whole run.
        dataset_size: N, number of training sequences (privacy units).
        seq_len: S, tokens per sequence.
        target_delta: δ; default ``min(1e-5, 1/(10 N))`` (a warning is added when δ >= 1/N).
        num_parameters: M (default: VaultGemma 1B).
        flops: Compute budget in FLOPs (at most one of ``flops``, ``tokens``, ``gpu_hours``; none = one epoch).
        tokens: Compute budget in training tokens.
        gpu_hours: Compute budget in GPU-hours (converted with ``throughput``).
        throughput: Training tokens/s per GPU (default: the H100 non-private anchor scaled to M).
        min_steps: Minimum number of steps the recommendation accepts (the heuristic's knob).
        batch_sizes: Logical batch sizes to consider (default: 5 powers of two around the recommendation).
        steps: Step counts to consider (default: the full budget and 1/2, 1/4, 1/8 of it for each batch size).
        tolerance: Relative ε tolerance of the calibration.
        workers: Processes used for calibration (default: available CPUs).
        pld_discretization: PLD value discretisation interval of the rows' ε (default
            :data:`PLANNER_PLD_DISCRETIZATION`; ``1e-4`` reports at the trainer's precision, ~8x slower). Rows whose
            ε is not stable at this interval are refined to ``1e-4`` (each row records its own interval).

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: On invalid inputs, or when the budget cannot pay for a single step.
    """
    warnings_: list[str] = []
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
        raise ValueError(f"dataset size must be a positive integer, got {dataset_size!r}.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"sequence length must be a positive integer, got {seq_len!r}.")
    if isinstance(num_parameters, bool) or not isinstance(num_parameters, int) or num_parameters < 1:
        raise ValueError(f"number of parameters must be a positive integer, got {num_parameters!r}.")
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise ValueError(f"epsilon must be a positive finite number, got {target_epsilon!r}.")
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
        raise ValueError(f"min steps must be a positive integer, got {min_steps!r}.")
    if throughput is not None and not (isinstance(throughput, (int, float)) and 0 < throughput < math.inf):
        raise ValueError(f"throughput must be a positive number of tokens/s, got {throughput!r}.")
    if target_delta is None:
        target_delta = default_delta(dataset_size)
    elif not (isinstance(target_delta, (int, float)) and 0 < target_delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {target_delta!r}.")
    elif target_delta >= 1.0 / dataset_size:
        warnings_.append(
            f"delta={target_delta:g} is not below 1/N = {1.0 / dataset_size:.3g}: a mechanism that publishes one "
            f"random training sequence in full satisfies it. Use delta < 1/N, e.g. "
            f"{default_delta(dataset_size):.3g}."
        )

    budget_flops, budget_text = _budget.flops_budget(
        num_parameters,
        flops=flops,
        tokens=tokens,
        gpu_hours=gpu_hours,
        throughput=throughput,
        dataset_size=dataset_size,
        seq_len=seq_len,
    )
    if throughput is None:
        rate = _budget.default_throughput(num_parameters)
        rate_source = (
            f"default: H100 non-private anchor ({_budget.ANCHOR_STEP_TOKENS} tokens in "
            f"{_budget.ANCHOR_STEP_SECONDS} s for VaultGemma 1B) scaled to {num_parameters:,} parameters; "
            "DP-SGD steps are slower, pass --throughput with a measured DP rate"
        )
    else:
        rate, rate_source = float(throughput), "given"
    total_sequences = _budget.sequences_in_budget(budget_flops, num_parameters, seq_len)
    if total_sequences < 1:
        minimum = _budget.training_flops(num_parameters, 1, seq_len, 1)
        raise ValueError(
            f"the compute budget of {budget_flops:.3g} FLOPs ({budget_text}) does not pay for a single step of one "
            f"sequence; the smallest feasible budget is {minimum:.3g} FLOPs (B = 1, T = 1), and "
            f"{minimum * min_steps:.3g} FLOPs for {min_steps:,} steps."
        )
    points, notes = _budget.build_grid(
        dataset_size, total_sequences, min_steps=min_steps, batch_sizes=batch_sizes, steps=steps
    )
    warnings_.extend(notes)
    if not points:
        smallest = min(batch_sizes or [1]) * min(steps or [1])
        raise ValueError(
            f"no (batch size, steps) configuration fits in the compute budget of {budget_flops:.3g} FLOPs "
            f"({total_sequences:,} sequences); the smallest one asked for needs "
            f"{_budget.training_flops(num_parameters, 1, seq_len, smallest):.3g} FLOPs."
        )

    start = time.perf_counter()
    calibrated = calibrate_grid(
        points,
        target_epsilon,
        target_delta,
        dataset_size,
        tolerance=tolerance,
        workers=workers,
        pld_discretization=pld_discretization,
    )
    elapsed = time.perf_counter() - start

    ratios = [None if c[0] is None else c[0] / p.logical_batch_size for p, c in zip(points, calibrated)]
    frontier = _budget.pareto_frontier([p.steps for p in points], ratios)
    rows = []
    for point, (sigma, epsilon, best, used, note), ratio, on_frontier in zip(points, calibrated, ratios, frontier):
        tokens_used = point.logical_batch_size * seq_len * point.steps
        flops_used = _budget.training_flops(num_parameters, point.logical_batch_size, seq_len, point.steps)
        rows.append(
            PlanRow(
                logical_batch_size=point.logical_batch_size,
                steps=point.steps,
                noise_multiplier=sigma,
                noise_batch_ratio=ratio,
                epsilon=epsilon,
                delta=target_delta,
                sampling_rate=point.logical_batch_size / dataset_size,
                epochs=point.logical_batch_size * point.steps / dataset_size,
                tokens=tokens_used,
                flops=flops_used,
                gpu_hours=tokens_used / rate / 3600.0,
                budget_fraction=flops_used / budget_flops,
                on_frontier=on_frontier,
                status="ok" if sigma is not None else "unreachable",
                note=note
                if best is None
                else f"unreachable: epsilon >= {best:.3g} even with sigma = {MAX_NOISE_MULTIPLIER:g}",
                pld_discretization=used,
            )
        )
    index, reached = _budget.recommend([r.steps for r in rows], ratios, frontier, min_steps)
    if index is None:
        best_eps, best = min(((c[2], p) for c, p in zip(calibrated, points)), key=lambda pair: pair[0])
        warnings_.append(
            f"epsilon={target_epsilon:g} is unreachable for every configuration. Nearest feasible: "
            f"epsilon >= {best_eps:.3g} with B = {best.logical_batch_size:,}, T = {best.steps:,}; "
            "or use fewer steps / a larger dataset."
        )
    elif not reached:
        smallest = min(r.logical_batch_size for r in rows)
        needed = _budget.training_flops(num_parameters, smallest, seq_len, min_steps)
        warnings_.append(
            f"no configuration reaches --min-steps {min_steps:,} within the budget; nearest feasible: "
            f"{needed:.3g} FLOPs ({min_steps:,} steps of batch {smallest:,}), or lower --min-steps."
        )
    noisy = [r for r in rows if r.status == "ok" and pld_precision_warning(r.delta, r.steps)]
    if noisy:
        warning = pld_precision_warning(target_delta, max(r.steps for r in noisy))
        warnings_.append(f"{len(noisy)} row(s): {warning}")
    unreachable = sum(r.status != "ok" for r in rows)
    if unreachable and index is not None:
        warnings_.append(f"{unreachable} configuration(s) cannot reach epsilon={target_epsilon:g} (marked).")
    return Plan(
        target_epsilon=float(target_epsilon),
        target_delta=float(target_delta),
        dataset_size=dataset_size,
        seq_len=seq_len,
        num_parameters=num_parameters,
        flops_budget=budget_flops,
        budget_description=budget_text,
        throughput=rate,
        throughput_source=rate_source,
        min_steps=min_steps,
        tolerance=tolerance,
        rows=rows,
        recommended=index,
        explanation=_explain(rows, index, reached, min_steps, target_epsilon),
        warnings=warnings_,
        calibration_seconds=elapsed,
        pld_discretization=pld_discretization,
    )
