"""`vaultgemma-hf plan`: plan a DP-SGD budget (privacy x compute x utility).

For a grid of logical batch sizes B and step counts T within a compute budget, calibrates the noise multiplier
σ that meets (ε, δ) (PLD accounting, Poisson sampling), and reports the noise-batch ratio σ̄ = σ/B, epochs,
tokens, FLOPs (C ≈ 6·M·B·S·T) and GPU-hours, the frontier and a recommended configuration. Example::

    vaultgemma-hf plan --epsilon 8 --dataset-size 1e6 --flops 1e20 --json plan.json --plot plan.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vaultgemma_hf.cli._io import boolean
from vaultgemma_hf.cli._io import positive_float as _positive_float
from vaultgemma_hf.cli._io import positive_int as _positive_int
from vaultgemma_hf.planning.budget import ANCHOR_STEP_SECONDS, ANCHOR_STEP_TOKENS, DEFAULT_MIN_STEPS


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers the `plan` sub-command."""
    parser = subparsers.add_parser(
        "plan",
        help="Plan a DP training budget (privacy x compute x utility).",
        description=__doc__.split("\n\n")[1].replace("::", ":"),
    )
    privacy = parser.add_argument_group("privacy target")
    privacy.add_argument("--epsilon", type=_positive_float, required=True, help="Target ε of the whole run.")
    privacy.add_argument(
        "--delta",
        type=_positive_float,
        default=None,
        help="Target δ (default: min(1e-5, 1/(10·N)); a warning is printed when δ >= 1/N).",
    )
    data = parser.add_argument_group("data (N = number of training sequences, the privacy unit)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset-size", type=_positive_int, help="N, number of training sequences.")
    source.add_argument(
        "--dataset",
        help="Count N from a .jsonl/.txt file: packed sequences with --tokenizer, else one document = one sequence.",
    )
    data.add_argument("--tokenizer", help="Tokenizer directory or tokenizer.json used to count tokens of --dataset.")
    data.add_argument("--text-field", default="text", help="Text key of .jsonl records (default: text).")
    data.add_argument("--seq-len", type=_positive_int, default=1024, help="Tokens per sequence S (default: 1024).")
    data.add_argument(
        "--cross-document-boundaries",
        type=boolean,
        default=True,
        metavar="{true,false}",
        help="With --tokenizer: count as `vaultgemma-hf train --cross_document_boundaries` packs (default true: "
        "sequences span documents; false: each document is cut into its own sequences).",
    )
    data.add_argument(
        "--canary-file",
        help="Audit canaries that `vaultgemma-hf train --canary-file` will add: N counts the included ones too.",
    )
    model = parser.add_argument_group("model size M (default: VaultGemma 1B, 1,038,741,120 parameters)")
    size = model.add_mutually_exclusive_group()
    size.add_argument("--config", help="config.json, model directory or preset name (vaultgemma-1b, tiny).")
    size.add_argument("--num-parameters", type=_positive_int, help="M given directly.")
    compute = parser.add_argument_group("compute budget (at most one; default: one epoch, N·S tokens)")
    budget = compute.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=_positive_float, help="Budget in FLOPs (C ≈ 6·M·B·S·T).")
    budget.add_argument("--tokens", type=_positive_float, help="Budget in training tokens (B·S·T).")
    budget.add_argument("--gpu-hours", type=_positive_float, help="Budget in GPU-hours (see --throughput).")
    compute.add_argument(
        "--throughput",
        type=_positive_float,
        help=(
            "Training tokens/s per GPU for GPU-hours. Default: the project's H100 anchor for a non-private step of "
            f"VaultGemma 1B ({ANCHOR_STEP_TOKENS} tokens in {ANCHOR_STEP_SECONDS} s ≈ 25.3k tokens/s), scaled to M; "
            "DP-SGD steps are slower, so pass a measured DP throughput."
        ),
    )
    grid = parser.add_argument_group("grid and recommendation")
    grid.add_argument(
        "--min-steps",
        type=_positive_int,
        default=DEFAULT_MIN_STEPS,
        help=f"Fewest steps the recommendation accepts (heuristic; default: {DEFAULT_MIN_STEPS}).",
    )
    grid.add_argument(
        "--batch-sizes", type=_int_list, help="Comma-separated logical batch sizes (default: 5 powers of 2)."
    )
    grid.add_argument(
        "--steps", type=_int_list, help="Comma-separated step counts (default: budget fractions 1..1/8)."
    )
    grid.add_argument("--tolerance", type=_positive_float, default=0.01, help="Relative ε tolerance (default: 0.01).")
    grid.add_argument("--workers", type=_positive_int, help="Calibration processes (default: available CPUs).")
    grid.add_argument(
        "--pld-discretization",
        type=_positive_float,
        default=1e-3,
        help="PLD value discretisation interval of the plan's ε (default: 1e-3, ~8x faster than the trainer's 1e-4; "
        "every interval gives an upper bound on ε, and rows whose ε is not stable at it are refined to 1e-4). "
        "Use 1e-4 to report every ε at the trainer's precision.",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", help="Write the plan (every row) to this JSON file (atomically).")
    out.add_argument("--plot", help="Write a PNG plot of σ̄ vs compute per batch size to this file (atomically).")
    out.add_argument("--quiet", action="store_true", help="Do not print the table.")
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    """Entry point of `vaultgemma-hf plan`."""
    try:
        return _plan(args)
    except (ValueError, OSError) as err:
        print(f"vaultgemma-hf plan: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"vaultgemma-hf plan: error: {err} (the plot needs: pip install 'vaultgemma-hf[plot]')", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from vaultgemma_hf.planning import count_parameters, count_sequences, load_model_config, plan_budget
    from vaultgemma_hf.planning.model_size import VAULTGEMMA_1B_PARAMETERS

    for flag in ("json", "plot"):  # fail before the calibration, not after it
        target = getattr(args, flag)
        if target is not None and (Path(target).is_dir() or not Path(target).absolute().parent.is_dir()):
            raise ValueError(f"--{flag} {target}: not a file path in an existing directory.")
    if args.plot:
        import matplotlib  # noqa: F401  (ImportError -> install hint)
    if args.tokenizer and not args.dataset:
        raise ValueError("--tokenizer is only used with --dataset.")
    if not args.cross_document_boundaries and not args.tokenizer:
        raise ValueError(
            "--cross-document-boundaries false counts packed sequences: it needs --dataset and --tokenizer."
        )
    if args.tolerance >= 0.5:
        raise ValueError(f"--tolerance must be < 0.5, got {args.tolerance}.")
    if args.delta is not None and args.delta >= 1:
        raise ValueError(f"--delta must be in (0, 1), got {args.delta}.")
    if args.dataset:
        dataset_size = count_sequences(
            args.dataset,
            args.seq_len,
            args.tokenizer,
            text_field=args.text_field,
            cross_document_boundaries=args.cross_document_boundaries,
        )
        how = f"{args.seq_len}-token packed sequences" if args.tokenizer else "documents (one per sequence)"
        print(f"{args.dataset}: {dataset_size:,} {how}.", file=sys.stderr)
    else:
        dataset_size = args.dataset_size
    if args.canary_file:
        from vaultgemma_hf.privacy_eval.canaries import check_canaries_fit, load_canaries

        canary_set = load_canaries(args.canary_file)
        check_canaries_fit(canary_set, seq_len=args.seq_len)
        included = len(canary_set.included)
        dataset_size += included
        print(f"{args.canary_file}: {included} audit canaries to include; N = {dataset_size:,}.", file=sys.stderr)
    if args.config:
        num_parameters = count_parameters(load_model_config(args.config))
    else:
        num_parameters = args.num_parameters or VAULTGEMMA_1B_PARAMETERS
    for flag in ("batch_sizes", "steps"):
        if getattr(args, flag) == []:
            raise ValueError(f"--{flag.replace('_', '-')} needs at least one value.")

    plan = plan_budget(
        target_epsilon=args.epsilon,
        dataset_size=dataset_size,
        seq_len=args.seq_len,
        target_delta=args.delta,
        num_parameters=num_parameters,
        flops=args.flops,
        tokens=args.tokens,
        gpu_hours=args.gpu_hours,
        throughput=args.throughput,
        min_steps=args.min_steps,
        batch_sizes=args.batch_sizes,
        steps=args.steps,
        tolerance=args.tolerance,
        workers=args.workers,
        pld_discretization=args.pld_discretization,
    )
    if not args.quiet:
        _print_plan(plan)
    for warning in plan.warnings:
        print(f"vaultgemma-hf plan: warning: {warning}", file=sys.stderr)
    if args.plot:
        from vaultgemma_hf.planning import plot_plan

        print(f"Wrote {plot_plan(plan, args.plot)}", file=sys.stderr)
    if args.json:
        from vaultgemma_hf.planning import save_plan

        print(f"Wrote {save_plan(plan, args.json)}", file=sys.stderr)
    if plan.recommended is None:
        print(f"vaultgemma-hf plan: error: {plan.explanation}", file=sys.stderr)
        return 1
    return 0


def _print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    from vaultgemma_hf.numbers import round_up

    console = Console(width=None if sys.stdout.isatty() else 150)  # pipes/files get a full-width table
    table = Table(
        title=(
            f"DP budget plan: ε = {plan.target_epsilon:g}, δ = {round_up(plan.target_delta, 3)}, N = {plan.dataset_size:,} x "
            f"{plan.seq_len} tokens, M = {plan.num_parameters:,}, budget {plan.flops_budget:.3g} FLOPs "
            f"({plan.budget_description})"
        ),
        caption=(
            f"PLD accounting (dp_accounting {plan.dp_accounting_version}, ε at discretisation "
            f"{plan.pld_discretization:g} unless noted), Poisson sampling, q = B/N. σ̄ = σ/B. "
            f"GPU-hours at {plan.throughput:,.0f} tokens/s ({plan.throughput_source}). "
            f"Calibration: {plan.calibration_seconds:.1f} s. ◆ frontier, ★ recommended."
        ),
    )
    for name in ("#", "", "batch B", "steps T", "σ", "σ̄=σ/B", "ε", "q", "epochs", "tokens", "FLOPs", "GPU-h"):
        table.add_column(name, justify="right" if name not in ("", "#") else "left")
    for i, row in enumerate(plan.rows):
        mark = "★" if i == plan.recommended else ("◆" if row.on_frontier else "")
        ok = row.noise_multiplier is not None
        table.add_row(
            str(i),
            mark,
            f"{row.logical_batch_size:,}",
            f"{row.steps:,}",
            round_up(row.noise_multiplier) if ok else "unreachable",
            f"{row.noise_batch_ratio:.3g}" if ok else "-",
            round_up(row.epsilon) if ok else "-",
            f"{row.sampling_rate:.3g}",
            f"{row.epochs:.3g}",
            f"{row.tokens:.3g}",
            f"{row.flops:.3g}",
            f"{row.gpu_hours:,.1f}",
            style="bold" if i == plan.recommended else None,
        )
    console.print(table)
    console.print(plan.explanation, highlight=False)
