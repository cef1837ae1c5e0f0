"""Plan files: JSON (``--json``, read back by ``DPTrainingArguments --plan``) and the PNG plot (``--plot``).

Both are written atomically: the bytes are rendered in memory, written to a temporary file beside the target
and renamed onto it, so a failure never leaves a partial file.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

from vaultgemma_hf.atomic_files import atomic_write_bytes
from vaultgemma_hf.numbers import round_up as _round_up
from vaultgemma_hf.planning.planner import PLAN_FORMAT, PLAN_FORMAT_VERSION, Plan

TRAINER_FIELDS = (
    "logical_batch_size",
    "steps",
    "noise_multiplier",
    "target_epsilon",
    "target_delta",
    "sampling",
    "sampling_rate",
    "dataset_size",
    "seq_len",
)
"""The fields :func:`load_plan` returns for the trainer (plus ``accountant``, ``epsilon`` and ``index``)."""

_ROW_FIELDS = ("logical_batch_size", "steps", "noise_multiplier", "epsilon", "delta", "sampling_rate", "status")


def _write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (nothing partial on failure); the directory must exist."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"output path {target} is a directory; give a file path.")
    if not target.parent.is_dir():
        raise ValueError(f"cannot write {target}: directory {target.parent} does not exist.")
    atomic_write_bytes(target, data)
    return target


def plan_to_json(plan: Plan) -> str:
    """The plan as JSON text (floats kept exact; ``null`` for unreachable rows)."""
    return json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n"


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Writes the plan JSON atomically; returns the path."""
    return _write_atomic(path, plan_to_json(plan).encode("utf-8"))


def plot_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Plots σ̄ against compute, one line per logical batch size, and writes the PNG atomically.

    Frontier rows are circled and the recommended one is starred. Uses matplotlib's Agg backend (no display).

    Raises:
        ImportError: If matplotlib is not installed (``pip install 'vaultgemma-hf[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=120)
    try:
        sizes = sorted({row.logical_batch_size for row in plan.rows})
        colors = plt.cm.viridis([i / max(len(sizes) - 1, 1) for i in range(len(sizes))])
        for size, color in zip(sizes, colors):
            rows = sorted(
                (r for r in plan.rows if r.logical_batch_size == size and r.noise_batch_ratio is not None),
                key=lambda r: r.flops,
            )
            if rows:
                ax.plot(
                    [r.flops for r in rows],
                    [r.noise_batch_ratio for r in rows],
                    "o-",
                    color=color,
                    label=f"B = {size:,}",
                    markersize=4,
                )
        frontier = [r for r in plan.rows if r.on_frontier]
        if frontier:
            ax.scatter(
                [r.flops for r in frontier],
                [r.noise_batch_ratio for r in frontier],
                s=90,
                facecolors="none",
                edgecolors="black",
                label="frontier (steps vs σ̄)",
            )
        best = plan.recommended_row
        if best is not None:
            ax.scatter(
                [best.flops],
                [best.noise_batch_ratio],
                marker="*",
                s=260,
                color="crimson",
                zorder=5,
                label=f"recommended: B = {best.logical_batch_size:,}, T = {best.steps:,}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C = 6·M·B·S·T (FLOPs)")
        ax.set_ylabel("noise-batch ratio σ̄ = σ / B")
        ax.set_title(
            f"DP budget plan: ε = {plan.target_epsilon:g}, δ = {_round_up(plan.target_delta, 2)}, "
            f"N = {plan.dataset_size:,} sequences of {plan.seq_len}"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: never hides data
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return _write_atomic(path, buffer.getvalue())


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid plan file {path}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_plan(path: str | os.PathLike, index: int | None = None) -> dict[str, Any]:
    """Reads a ``vaultgemma-hf plan --json`` file and returns one configuration for the trainer.

    Args:
        path: The plan JSON.
        index: Row to use (0-based, as in the JSON ``rows`` list); default: the recommended row.

    Returns:
        A dict with :data:`TRAINER_FIELDS` plus ``accountant``, ``epsilon`` (the row's PLD ε) and ``index``.

    Raises:
        ValueError: If the file is missing, malformed, inconsistent, or the row is not usable (unreachable).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"invalid plan file {path}: not JSON ({err}).") from err
    _require(isinstance(data, dict) and data.get("format") == PLAN_FORMAT, path, f"'format' is not {PLAN_FORMAT!r}.")
    _require(
        data.get("format_version") == PLAN_FORMAT_VERSION,
        path,
        f"unsupported format_version {data.get('format_version')!r} (expected {PLAN_FORMAT_VERSION}).",
    )
    for key in ("target_epsilon", "target_delta", "dataset_size", "seq_len", "rows", "sampling", "accountant"):
        _require(key in data, path, f"missing {key!r}.")
    epsilon, delta, size, seq_len = (data[k] for k in ("target_epsilon", "target_delta", "dataset_size", "seq_len"))
    _require(_is_number(epsilon) and epsilon > 0, path, f"target_epsilon must be > 0, got {epsilon!r}.")
    _require(_is_number(delta) and 0 < delta < 1, path, f"target_delta must be in (0, 1), got {delta!r}.")
    _require(_is_int(size) and size >= 1, path, f"dataset_size must be a positive integer, got {size!r}.")
    _require(_is_int(seq_len) and seq_len >= 1, path, f"seq_len must be a positive integer, got {seq_len!r}.")
    _require(data["sampling"] == "poisson", path, f"sampling must be 'poisson', got {data['sampling']!r}.")
    _require(data["accountant"] == "pld", path, f"accountant must be 'pld', got {data['accountant']!r}.")
    rows = data["rows"]
    _require(isinstance(rows, list) and rows, path, "'rows' must be a non-empty list.")

    if index is None:
        index = data.get("recommended")
        _require(index is not None, path, "it has no recommended configuration; choose a row with an index.")
    if not _is_int(index) or not 0 <= index < len(rows):
        raise ValueError(f"plan row index {index!r} is out of range: the plan {path} has {len(rows)} rows.")
    row = rows[index]
    _require(isinstance(row, dict), path, f"row {index} is not an object.")
    missing = [key for key in _ROW_FIELDS if key not in row]
    _require(not missing, path, f"row {index} lacks {missing}.")
    _require(row["status"] == "ok", path, f"row {index} cannot reach the target ({row.get('note') or 'unreachable'}).")
    batch, steps, sigma, row_eps = (row[k] for k in ("logical_batch_size", "steps", "noise_multiplier", "epsilon"))
    _require(_is_int(batch) and 1 <= batch <= size, path, f"row {index}: logical_batch_size must be in [1, N].")
    _require(_is_int(steps) and steps >= 1, path, f"row {index}: steps must be a positive integer.")
    _require(_is_number(sigma) and sigma > 0, path, f"row {index}: noise_multiplier must be > 0.")
    _require(
        _is_number(row_eps) and row_eps <= epsilon * (1 + 1e-9),
        path,
        f"row {index}: epsilon {row_eps!r} exceeds the target {epsilon}.",
    )
    _require(row["delta"] == delta, path, f"row {index}: delta {row['delta']!r} differs from target_delta {delta}.")
    _require(
        _is_number(row["sampling_rate"]) and math.isclose(row["sampling_rate"], batch / size, rel_tol=1e-9),
        path,
        f"row {index}: sampling_rate {row['sampling_rate']!r} != logical_batch_size / dataset_size = {batch / size}.",
    )
    return {
        "logical_batch_size": batch,
        "steps": steps,
        "noise_multiplier": float(sigma),
        "target_epsilon": float(epsilon),
        "target_delta": float(delta),
        "sampling": data["sampling"],
        "sampling_rate": float(row["sampling_rate"]),
        "dataset_size": size,
        "seq_len": seq_len,
        "accountant": data["accountant"],
        "epsilon": float(row_eps),
        "index": index,
    }
