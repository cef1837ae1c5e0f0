"""Benchmark of the DP budget planner: time of a 20-row table and its accuracy against full PLD calibration.

For each scenario it times `plan_budget` (20 configurations, calibration in `--workers` processes), then
re-calibrates every row from scratch with `dp_accounting`'s own `calibrate_dp_mechanism` (PLD accountant at its
default precision, Brent's method to a relative σ tolerance of 1e-5) and reports:

- the wall time of the planner (and its calibration part), and of the whole `vaultgemma-hf plan` command
  (imports included) for the same scenario,
- the maximum relative ε error |ε(σ_planner) - ε(σ_reference)| / ε(σ_reference),
- how many rows pass the brief's acceptance test (ε <= target and ε >= target·0.99, or ε(0.99σ) > target).

Pure CPU work (accounting); there is no `--device`. Usage::

    python benchmarks/planner.py                      # all scenarios, reference included (minutes)
    python benchmarks/planner.py --scenario continued-pretraining --skip-reference
    taskset -c 0,1 python benchmarks/planner.py       # pin to 2 cores on a bigger machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import dp_accounting
from dp_accounting import mechanism_calibration, pld

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from vaultgemma_hf.dp.accounting import (  # noqa: E402
    DEFAULT_PLD_DISCRETIZATION,
    PLD_NOISE_FLOOR_PER_STEP,
    _extended_precision_composition,
    dp_accounting_version,
)
from vaultgemma_hf.planning import plan_budget  # noqa: E402

SCENARIOS = {
    # A continued-pretraining run of VaultGemma 1B on 1M sequences of 1024 tokens: σ ≈ 0.5-0.9 (slow PLDs).
    "continued-pretraining": dict(target_epsilon=8.0, dataset_size=1_000_000, flops=1e20),
    # Same data and budget with a tighter ε: σ ≈ 1-3.
    "tight-epsilon": dict(target_epsilon=1.0, dataset_size=1_000_000, flops=1e20),
    # VaultGemma's own scale (13T tokens ≈ 1.27e10 sequences; its reported run: B ≈ 518K, T = 1e5, σ = 0.614):
    # tiny q, T up to 4e5, σ ≈ 0.6, the slowest regime for PLD.
    "vaultgemma-scale": dict(
        target_epsilon=2.0, target_delta=1.1e-10, dataset_size=12_695_312_500, flops=3.3e23, min_steps=100_000
    ),
}


def reference_sigma(target: float, q: float, steps: int, delta: float, guess: float) -> float:
    """Full dp_accounting calibration of σ (PLD, default precision); independent of the planner's search."""

    def event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )

    with _precise_enough(steps, delta):
        return mechanism_calibration.calibrate_dp_mechanism(
            pld.PLDAccountant,
            event,
            target,
            delta,
            mechanism_calibration.LowerEndpointAndGuess(lower_endpoint=0.1, initial_guess=guess * 1.05),
            tol=guess * 1e-5,
        )


def _precise_enough(steps: int, delta: float):
    """Below dp_accounting's float64 floor (δ <= T x 1e-14) its composition is wrong in either direction, so the
    reference composes in 80-bit precision there too (dp_accounting's own algorithm; see dp/accounting.py)."""
    if delta <= steps * PLD_NOISE_FLOOR_PER_STEP:
        return _extended_precision_composition()
    return contextlib.nullcontext()


def pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = pld.PLDAccountant()
    with _precise_enough(steps, delta):
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
        )
        return accountant.get_epsilon(delta)


def check_row(args: tuple) -> dict:
    target, q, steps, delta, sigma = args
    start = time.perf_counter()
    ref = reference_sigma(target, q, steps, delta, sigma)
    eps_ref = pld_epsilon(ref, q, steps, delta)
    eps = pld_epsilon(sigma, q, steps, delta)
    accepted = eps <= target and (eps >= 0.99 * target or pld_epsilon(0.99 * sigma, q, steps, delta) > target)
    return dict(
        sigma_ref=ref,
        eps=eps,
        eps_ref=eps_ref,
        rel_err=abs(eps - eps_ref) / eps_ref,
        accepted=accepted,
        seconds=time.perf_counter() - start,
    )


def cli_seconds(kwargs: dict, workers: int) -> float:
    """Wall time of the equivalent `vaultgemma-hf plan` command in a fresh interpreter (imports included)."""
    flags = {"target_epsilon": "--epsilon", "target_delta": "--delta", "dataset_size": "--dataset-size"}
    argv = [sys.executable, "-m", "vaultgemma_hf.cli.main", "plan", "--quiet", "--workers", str(workers)]
    for key, value in kwargs.items():
        argv += [flags.get(key, "--" + key.replace("_", "-")), str(value)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([*argv, "--json", os.path.join(tmp, "plan.json")], check=True, capture_output=True)
        return time.perf_counter() - start


def run(name: str, workers: int, skip_reference: bool) -> None:
    kwargs = SCENARIOS[name]
    start = time.perf_counter()
    plan = plan_budget(**kwargs, workers=workers)
    wall = time.perf_counter() - start
    print(f"\n## {name}: {kwargs}")
    refined = sum(r.pld_discretization != plan.pld_discretization for r in plan.rows)
    print(
        f"{len(plan.rows)} rows in {wall:.2f} s wall (calibration {plan.calibration_seconds:.2f} s, "
        f"{workers} worker process(es)); ε at PLD discretisation {plan.pld_discretization:g}, {refined} row(s) "
        f"reported at {DEFAULT_PLD_DISCRETIZATION:g} (refined, or checked there where ε is numerically noisy)"
    )
    print(f"`vaultgemma-hf plan` end to end: {cli_seconds(kwargs, workers):.2f} s wall")
    if skip_reference:
        for row in plan.rows:
            print(
                f"  B={row.logical_batch_size:>9,} T={row.steps:>7,} q={row.sampling_rate:.3g} "
                f"σ={row.noise_multiplier:.5f} ε={row.epsilon:.5f} (PLD {row.pld_discretization:g})"
            )
        return
    jobs = [(plan.target_epsilon, r.sampling_rate, r.steps, r.delta, r.noise_multiplier) for r in plan.rows]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(check_row, jobs))
    print(
        "| B | T | q | σ (planner) | σ (dp_accounting) | σ ratio - 1 | ε (planner) | ε (reference) | rel. ε error | accepted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, check in zip(plan.rows, checks):
        print(
            f"| {row.logical_batch_size:,} | {row.steps:,} | {row.sampling_rate:.3g} | {row.noise_multiplier:.5f} | "
            f"{check['sigma_ref']:.5f} | {row.noise_multiplier / check['sigma_ref'] - 1:+.3%} | {check['eps']:.5f} | "
            f"{check['eps_ref']:.5f} | {check['rel_err']:.3%} | {'yes' if check['accepted'] else 'NO'} |"
        )
    reference_cpu = sum(c["seconds"] for c in checks)
    shortfall = max((c["eps_ref"] - c["eps"]) / c["eps_ref"] for c in checks)
    sigma_gap = max(abs(r.noise_multiplier / c["sigma_ref"] - 1) for r, c in zip(plan.rows, checks))
    print(
        f"SUMMARY {name}: planner {wall:.2f} s for {len(plan.rows)} rows; vs full PLD calibration: max rel. ε error "
        f"{max(c['rel_err'] for c in checks):.3%} (max ε left unused {shortfall:.3%}), max |σ/σ_ref - 1| "
        f"{sigma_gap:.3%}; accepted {sum(c['accepted'] for c in checks)}/{len(checks)}; reference calibration "
        f"{reference_cpu:.0f} CPU-s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append", help="Default: all.")
    parser.add_argument("--workers", type=int, default=2, help="Planner (and reference) processes (default: 2).")
    parser.add_argument("--skip-reference", action="store_true", help="Only time the planner.")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"# planner benchmark: {platform.machine()}, {cores} usable core(s), python {platform.python_version()}, "
        f"dp_accounting {dp_accounting_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    for name in args.scenario or list(SCENARIOS):
        run(name, args.workers, args.skip_reference)


if __name__ == "__main__":
    main()
