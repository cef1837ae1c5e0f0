"""The "Empirical privacy audit" section of a model card (README.md), written next to the DP configuration.

The section sits between two HTML comment markers, so auditing again replaces it instead of appending a second
one; the rest of the card (the trainer's disclosure of the guarantee) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from vaultgemma_hf.atomic_files import atomic_write_text
from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.privacy_eval.audit import AuditReport

__all__ = [
    "AUDIT_BEGIN",
    "AUDIT_END",
    "check_model_card",
    "model_card_with_audit",
    "render_audit_section",
    "write_audit_to_model_card",
]

AUDIT_BEGIN = "<!-- vaultgemma-hf privacy audit: begin -->"
AUDIT_END = "<!-- vaultgemma-hf privacy audit: end -->"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render_audit_section(report: AuditReport) -> str:
    """Markdown for the audit results (markers included)."""
    canaries = report.canaries
    mia, one_run, exposure = canaries["membership_inference"], canaries["one_run"], canaries["exposure"]
    claimed = "none" if report.claimed_epsilon is None else round_up(report.claimed_epsilon)
    rows = [
        ("Verdict", report.verdict_text),
        ("Claimed ε (δ)", f"{claimed} ({report.delta:g})"),
        (
            f"ε lower bound ({100 * (1 - report.significance):g}% confidence, one run)",
            f"{one_run['epsilon_lower_bound']:.4g} (Bonferroni over {one_run['bonferroni_settings']} guess setting(s))",
        ),
        (
            "Canaries",
            f"{canaries['num_canaries']} random-token sequences of {canaries['canary_length']} tokens, "
            f"{canaries['num_included']} trained on (each its own privacy unit), {canaries['num_held_out']} held out",
        ),
        ("Membership score", report.score),
        ("Canary membership inference: AUC", f"{mia['auc']:.3f} (0.5 = chance)"),
        (
            "TPR at FPR 10% / 1% / 0.1%",
            " / ".join(_pct(mia["tpr_at_fpr"][level]) for level in ("0.1", "0.01", "0.001"))
            + (" (n/a: fewer held-out canaries than 1/FPR)" if None in mia["tpr_at_fpr"].values() else ""),
        ),
        (
            "Canary exposure (mean / max, bits)",
            f"{exposure['mean']:.2f} / {exposure['max']:.2f} (mean {exposure['expected_without_memorisation']:.2f} "
            f"without memorisation; at most {exposure['max_measurable']:.2f} with {exposure['num_references']} "
            "references)",
        ),
    ]
    if report.training_data is not None:
        data = report.training_data
        rows.append(
            (
                "Training-data membership inference: AUC",
                f"{data['auc']:.3f} ({data['num_members']} training vs {data['num_nonmembers']} held-out sequences)",
            )
        )
    for name, result in (report.extraction or {}).items():
        title = f"Extraction, {name} sequences ({result['prefix_len']}-token prefix → {result['suffix_len']} tokens)"
        if result["num_tested"] == 0:
            value = f"not measured: none of the {result['num_skipped']} sequences is long enough"
        else:
            value = (
                f"exact {_pct(result['exact_rate'])}, within {result['max_edit_fraction']:.0%} edit distance "
                f"{_pct(result['approximate_rate'])} of {result['num_tested']} tested"
            )
        rows.append((title, value))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        f"{AUDIT_BEGIN}\n## Empirical privacy audit\n\n"
        "Measured after training with `vaultgemma-hf audit` (Steinke, Nasr & Jagielski 2023 one-run bound; "
        "Carlini et al. 2019 exposure; the VaultGemma model card's extraction test). An audit can refute a "
        "guarantee, never prove it: a lower bound below the claimed ε is the expected outcome of a correct "
        "implementation.\n\n| | |\n|---|---|\n"
        f"{table}\n{AUDIT_END}\n"
    )


def model_card_with_audit(model_dir: str | os.PathLike, report: AuditReport) -> tuple[Path, str]:
    """The path of ``model_dir/README.md`` and its text with the audit section added or replaced (nothing written).

    Raises:
        ValueError: the card has a begin marker without its end marker (edited by hand: fix it first).
        OSError: the card exists but cannot be read.
    """
    path = Path(model_dir) / "README.md"
    section = render_audit_section(report)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = _section_bounds(path, text)
    if start == -1:
        return path, text.rstrip("\n") + ("\n\n" if text else "") + section
    return path, text[:start] + section + text[end + len(AUDIT_END) :].lstrip("\n")


def _section_bounds(path: Path, text: str) -> tuple[int, int]:
    start = text.find(AUDIT_BEGIN)
    end = text.find(AUDIT_END, start) if start != -1 else -1
    if start != -1 and end == -1:
        raise ValueError(f"{path}: its audit section has a begin marker but no end marker ({AUDIT_END!r}).")
    return start, end


def check_model_card(model_dir: str | os.PathLike) -> None:
    """Raises before any work if ``model_dir/README.md`` cannot take an audit section (unreadable, broken markers)."""
    path = Path(model_dir) / "README.md"
    if path.exists():
        _section_bounds(path, path.read_text(encoding="utf-8"))


def write_audit_to_model_card(model_dir: str | os.PathLike, report: AuditReport) -> Path:
    """Adds (or replaces) the audit section of ``model_dir/README.md``, atomically; returns the card's path."""
    path, text = model_card_with_audit(model_dir, report)
    atomic_write_text(path, text)
    return path
