"""Model card (README.md) disclosing the DP guarantee of a `DPTrainer` run.

[`DPTrainingSummary`] is a plain, JSON-able record of everything the guarantee depends on; [`render_model_card`]
turns it into Markdown from `templates/model_card.md`; [`write_model_card`] writes it atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any

from vaultgemma_hf.atomic_files import atomic_write_text
from vaultgemma_hf.numbers import round_up

#: VaultGemma 1B's published pretraining guarantee (model card / technical report).
VAULTGEMMA_PRETRAINING_GUARANTEE = (
    "VaultGemma 1B was pretrained with DP-SGD with a sequence-level guarantee of **ε ≤ 2.0, δ ≤ 1.1e-10**, where "
    "the privacy unit is one 1024-token sequence of its pretraining mixture (truncated Poisson sampling, PLD "
    "accounting)."
)

_ACCOUNTING_TEXT = {
    "poisson": "The accountant composes one Poisson-subsampled Gaussian mechanism (`PoissonSampledDpEvent`) per step, "
    "including steps whose sampled batch was empty.",
    "truncated_poisson": "The accountant composes one truncated-Poisson subsampled Gaussian mechanism "
    "(`TruncatedSubsampledGaussianDpEvent`) per step, including steps whose sampled batch was empty.",
    "shuffle": "Shuffled batches get no amplification: the accountant composes one Gaussian mechanism of sensitivity C "
    "per started epoch (an epoch is floor(N / L) = {per_epoch} steps, the other N mod L units sit it out; {epochs} "
    "epochs here).",
}

_SAMPLING_TEXT = {
    "poisson": (
        "Poisson sampling (each unit independently with probability q; variable batch size)",
        "Poisson sampling",
    ),
    "truncated_poisson": (
        "truncated Poisson sampling (Poisson, then capped at {cap} units by a uniform random subset; fixed physical "
        "batch with masked padding)",
        "truncated Poisson sampling",
    ),
    "shuffle": (
        "SHUFFLED fixed-size batches (opted in; no Poisson amplification, accounted as such — a weaker guarantee)",
        "shuffling the data set and cutting it into fixed-size batches",
    ),
}


@dataclass
class DPTrainingSummary:
    """Everything a reader needs to interpret the guarantee of one DP training run (JSON-able)."""

    base_model: str
    model_name: str
    privacy_unit: str
    epsilon: float
    delta: float
    target_epsilon: float | None
    accountant: str
    dp_accounting_version: str
    sampling: str
    sampling_rate: float
    noise_multiplier: float
    clip_norm: float
    logical_batch_size: int
    max_physical_batch: int | None
    steps: int
    dataset_size: int
    dataset_sha256: str
    trainable_parameters: int
    frozen_parameters: int
    frozen_parameter_names: list[str] = field(default_factory=list)
    seq_len: int | None = None
    base_model_type: str | None = None
    non_private: bool = False
    shuffled_without_amplification: bool = False
    deterministic_noise_for_testing: bool = False

    @property
    def epochs(self) -> float:
        """Expected passes over the data: steps × q."""
        return self.steps * self.sampling_rate

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (ε = ∞ is written as the string "inf")."""
        data = dataclasses.asdict(self)
        data["epsilon"] = _json_float(self.epsilon)
        data["epochs"] = self.epochs
        return data


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _fmt_up(value: float | None, digits: int = 4) -> str:
    """Like `_fmt`, but rounded up (`round_up`), so a printed ε or δ is never smaller than the computed one."""
    return _fmt(value, digits) if value is None or math.isinf(value) else round_up(value, digits)


def _fmt_bound(value: float | None, digits: int) -> str:
    """`_fmt_up`, followed by the exact value (as recorded in ``dp_state.json``) when rounding changed it."""
    shown = _fmt_up(value, digits)
    if value is None or math.isinf(value) or float(shown) == float(value):
        return shown
    return f"{shown} (exact: {float(value)!r})"


def render_model_card(summary: DPTrainingSummary) -> str:
    """Renders the Markdown model card of a run."""
    template = Template(
        resources.files("vaultgemma_hf.trainer").joinpath("templates/model_card.md").read_text("utf-8")
    )
    flags = []
    banner = ""
    if summary.non_private:
        flags.append("NON-PRIVATE control run (noise_multiplier = 0)")
        banner = (
            "> **NOT PRIVATE.** This run used noise_multiplier = 0 as a non-private control: it has no differential "
            "privacy guarantee (ε = ∞). Do not release it as a private model.\n"
        )
    if summary.shuffled_without_amplification:
        flags.append("shuffled batches without Poisson amplification (opt-in)")
    if summary.deterministic_noise_for_testing:
        flags.append("deterministic (seeded) noise for testing")
        banner += (
            "> **TESTING RUN.** Sampling and noise were seeded deterministically; anyone who knows the seed can "
            "reproduce the noise, so the guarantee below does not hold in practice.\n"
        )
    long_text, short_text = _SAMPLING_TEXT[summary.sampling]
    long_text = long_text.format(cap=summary.max_physical_batch)
    unit = (
        f"one user (each sampled user contributes one sequence{_seq_len_text(summary.seq_len)} per step)"
        if summary.privacy_unit == "user"
        else f"one training sequence{_seq_len_text(summary.seq_len)}"
    )
    if summary.non_private:
        guarantee = "This run is **not** differentially private (noise_multiplier = 0, ε = ∞)."
    else:
        relation, caveat = _adjacency_text(summary.sampling, unit)
        guarantee = (
            f"The released weights satisfy **(ε = {_fmt_up(summary.epsilon)}, δ = {_fmt_up(summary.delta, 3)})-differential "
            f"privacy** with respect to {relation}, after {summary.steps} steps.{caveat}"
        )
    from vaultgemma_hf.dp.accounting import PLD_NOISE_FLOOR_PER_STEP, pld_precision_warning, shuffle_epochs
    from vaultgemma_hf.dp.sampling import steps_per_epoch

    accounting = _ACCOUNTING_TEXT[summary.sampling]
    if summary.sampling == "shuffle":
        accounting = accounting.format(
            per_epoch=steps_per_epoch(summary.dataset_size, summary.logical_batch_size, "shuffle"),
            epochs=shuffle_epochs(summary.steps, summary.dataset_size, summary.logical_batch_size),
        )
    if summary.accountant == "pld" and not summary.non_private and pld_precision_warning(summary.delta, summary.steps):
        accounting += (
            f" At δ ≤ T × {PLD_NOISE_FLOOR_PER_STEP:g} dp_accounting's float64 PLD composition is numerically "
            f"unreliable, so the {summary.steps}-fold composition was computed in 80-bit extended precision."
        )
    frozen_list = ""
    if summary.frozen_parameter_names:
        shown = summary.frozen_parameter_names[:64]
        more = len(summary.frozen_parameter_names) - len(shown)
        frozen_list = "Frozen (not trained, not noised) parameter tensors:\n\n" + "".join(f"- `{n}`\n" for n in shown)
        if more > 0:
            frozen_list += f"- … and {more} more\n"
        frozen_list += "\n"
    if summary.base_model_type == "vaultgemma":
        base_guarantee = VAULTGEMMA_PRETRAINING_GUARANTEE
    else:
        base_guarantee = (
            f"The base model `{summary.base_model}` (model type {summary.base_model_type!r}) is not VaultGemma; any "
            "guarantee of its own pretraining is whatever its authors state. For reference: "
            + VAULTGEMMA_PRETRAINING_GUARANTEE
        )
    values = {
        "base_model": summary.base_model,
        "model_name": summary.model_name,
        "banner": banner + ("\n" if banner else ""),
        "guarantee_sentence": guarantee,
        "privacy_unit": unit,
        "epsilon": _fmt_bound(summary.epsilon, 4) + (" (NOT PRIVATE)" if summary.non_private else ""),
        "delta": _fmt_bound(summary.delta, 3),
        "target_epsilon": _fmt(summary.target_epsilon),
        "accountant": {"pld": "PLD (privacy loss distributions)", "rdp": "RDP (Rényi DP)"}[summary.accountant],
        "dp_accounting_version": summary.dp_accounting_version,
        "sampling": long_text,
        "sampling_short": short_text,
        "accounting_sentence": accounting,
        "sampling_rate": _fmt(summary.sampling_rate, 6),
        "noise_multiplier": _fmt(summary.noise_multiplier, 6),
        "clip_norm": _fmt(summary.clip_norm, 6),
        "noise_std": _fmt(summary.noise_multiplier * summary.clip_norm, 6),
        "logical_batch_size": str(summary.logical_batch_size),
        "steps": str(summary.steps),
        "epochs": _fmt(summary.epochs),
        "dataset_size": str(summary.dataset_size),
        "dataset_sha256": summary.dataset_sha256,
        "trainable_parameters": f"{summary.trainable_parameters:,}",
        "frozen_parameters": f"{summary.frozen_parameters:,} ({len(summary.frozen_parameter_names)} tensors)",
        "seq_len": "—" if summary.seq_len is None else str(summary.seq_len),
        "noise_source": "seeded (testing only)"
        if summary.deterministic_noise_for_testing
        else "fresh OS entropy per run (never restored from checkpoints)",
        "flags": "; ".join(flags) if flags else "none",
        "frozen_list": frozen_list,
        "base_guarantee": base_guarantee,
    }
    return template.substitute(values)


def _adjacency_text(sampling: str, unit: str) -> tuple[str, str]:
    """The neighbouring relation under which the accounted (ε, δ) holds for `sampling`, and a caveat (or "").

    Poisson schemes are accounted for add/remove adjacency. The shuffle bound (one Gaussian of sensitivity C per
    epoch) needs N and everyone else's batches to stay the same, i.e. zero-out adjacency; it is no add/remove bound,
    and replacing a unit by another has sensitivity 2C (zero-out (ε, δ) only gives (2ε, (1 + e^ε)δ) for that).

    Returns:
        ``(relation, caveat)``: the relation completes "with respect to ..."; the caveat starts with a space.
    """
    if sampling != "shuffle":
        return f"adding or removing {unit} of the training set described below (add/remove adjacency)", ""
    return (
        f"replacing {unit} of the training set described below by a null unit that contributes a zero gradient "
        "(zero-out adjacency)",
        " With shuffled fixed-size batches this bound does **not** hold for add/remove adjacency (adding or removing "
        "a unit moves other units between batches), and replacing a unit by another one has gradient sensitivity 2C: "
        "for that relation the run is only (2ε, (1 + e^ε)δ)-differentially private.",
    )


def _seq_len_text(seq_len: int | None) -> str:
    return f" of {seq_len} tokens" if seq_len else ""


def write_model_card(output_dir: str | os.PathLike, summary: DPTrainingSummary) -> str:
    """Writes `README.md` into `output_dir` (atomically) and returns its path."""
    path = os.path.join(os.fspath(output_dir), "README.md")
    atomic_write_text(path, render_model_card(summary))
    return path
