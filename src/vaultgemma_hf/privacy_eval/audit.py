"""The privacy audit of a trained model: canaries, membership inference, exposure, extraction, ε lower bound.

[`run_privacy_audit`] measures, on a model trained with audit canaries (see [`make_canaries`] and
[`append_canaries`]):

1. **Membership inference on the canaries** — score each canary (log-likelihood ratio against the base model
   when one is given, else the plain log-likelihood), then ROC AUC and TPR at low FPR between included and
   held-out canaries.
2. **One-run ε lower bound** (Steinke, Nasr & Jagielski 2023) from the same scores: guess the top-k canaries
   as members and the bottom-k as non-members; at significance α, any ε below the bound is refuted. If the
   test rejects the ε the trainer claims, the training did **not** deliver its guarantee (a bug, or a setting
   that breaks it): the report says ``"violation"``. Several k are allowed and Bonferroni-corrected.
3. **Exposure** (Carlini et al. 2019) of each included canary against held-out and fresh reference canaries.
4. Optionally, **membership inference on the training data** (training vs held-out sequences) and the model
   card's **verbatim extraction test** (50-token prefix → 50-token suffix) on both.

A bound below the claim does not prove the claim (audits are lower bounds); a bound above it disproves it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from vaultgemma_hf.numbers import round_up
from vaultgemma_hf.privacy_eval.canaries import CanarySet, check_canaries_fit
from vaultgemma_hf.privacy_eval.extraction import extraction_test
from vaultgemma_hf.privacy_eval.scoring import sequence_log_perplexity
from vaultgemma_hf.privacy_eval.stats import exposure, one_run_audit, one_run_p_value, roc_auc, tpr_at_fpr

__all__ = ["AuditReport", "expected_exposure_without_memorisation", "membership_scores", "run_privacy_audit"]

FPR_LEVELS = (0.1, 0.01, 0.001)


@dataclass
class AuditReport:
    """Everything [`run_privacy_audit`] measured (JSON-ready with [`AuditReport.to_json`])."""

    verdict: str
    verdict_text: str
    claimed_epsilon: float | None
    delta: float
    significance: float
    score: str
    canaries: dict[str, Any]
    training_data: dict[str, Any] | None = None
    extraction: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (infinite ε written as the string ``"inf"``)."""
        data = asdict(self)
        if data["claimed_epsilon"] is not None and math.isinf(data["claimed_epsilon"]):
            data["claimed_epsilon"] = "inf"
        return data

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


def membership_scores(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    reference_model: torch.nn.Module | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Membership score of each sequence: higher means "more likely trained on".

    With a reference model (the base model before continued training) the score is the log-likelihood ratio
    ``logppl_reference - logppl_model`` (how much training lowered the sequence's loss), which removes how
    predictable the sequence is anyway; without one it is ``-logppl_model``.
    """
    scores = -sequence_log_perplexity(model, sequences, batch_size=batch_size)
    if reference_model is not None:
        scores += sequence_log_perplexity(reference_model, sequences, batch_size=batch_size)
    return scores


def _mia_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    # TPR at an FPR below 1/n_nonmembers could only be "TPR at FPR 0": reported as None (not measurable).
    measurable = {level: level * nonmember_scores.size >= 1 for level in FPR_LEVELS}
    return {
        "num_members": int(member_scores.size),
        "num_nonmembers": int(nonmember_scores.size),
        "auc": roc_auc(member_scores, nonmember_scores),
        "tpr_at_fpr": {
            f"{level:g}": tpr_at_fpr(member_scores, nonmember_scores, level) if measurable[level] else None
            for level in FPR_LEVELS
        },
    }


def expected_exposure_without_memorisation(num_references: int) -> float:
    """Mean exposure of a canary whose rank among ``num_references + 1`` candidates is uniform (no memorisation).

    E[log2(n+1) - log2(rank)] for rank uniform on 1..n+1: log2(n+1) - log2((n+1)!)/(n+1), which tends to
    log2(e) ≈ 1.44 bits; the median is about 1 bit.
    """
    n = num_references + 1
    return math.log2(n) - math.lgamma(n + 1) / (math.log(2.0) * n)


def _verdict(
    epsilon_lower_bound: float,
    refuted: bool | None,
    claimed_epsilon: float | None,
    delta: float,
    significance: float,
    sampling: str | None,
) -> tuple[str, str]:
    confidence = f"{100 * (1 - significance):g}%"
    bound = f"at {confidence} confidence ε ≥ {epsilon_lower_bound:.4g} (δ={delta:g})"
    if claimed_epsilon is None:
        return "no_claim", f"No ε claim was given; {bound}."
    if math.isinf(claimed_epsilon):
        return "non_private", f"The model claims no guarantee; {bound}."
    if sampling == "shuffle":
        return "not_comparable", (
            f"Not comparable: the claimed ε = {round_up(claimed_epsilon)} is for shuffled batches under zero-out adjacency, "
            f"while including or leaving out a canary is add/remove adjacency; {bound}."
        )
    if refuted:
        return "violation", (
            f"VIOLATION: at {confidence} confidence the model is not ({round_up(claimed_epsilon)}, {delta:g})-DP "
            f"(empirical lower bound ε ≥ {epsilon_lower_bound:.4g}). The training did not deliver its claimed "
            "guarantee."
        )
    return "consistent", (
        f"Consistent with the claim: the empirical lower bound ε ≥ {epsilon_lower_bound:.4g} does not exceed the "
        f"claimed ε = {round_up(claimed_epsilon)} (δ={delta:g}, {confidence} confidence). An audit can refute a guarantee, "
        "not prove it."
    )


def _subset(sequences: Sequence[Sequence[int]], limit: int, rng: np.random.Generator) -> list[Sequence[int]]:
    if len(sequences) <= limit:
        return list(sequences)
    return [sequences[i] for i in sorted(rng.choice(len(sequences), limit, replace=False))]


def run_privacy_audit(
    model: torch.nn.Module,
    canary_set: CanarySet,
    *,
    reference_model: torch.nn.Module | None = None,
    claimed_epsilon: float | None = None,
    delta: float = 1e-5,
    significance: float = 0.05,
    sampling: str | None = None,
    guesses_per_side: Sequence[int] | None = None,
    num_exposure_references: int = 0,
    training_sequences: Sequence[Sequence[int]] | None = None,
    heldout_sequences: Sequence[Sequence[int]] | None = None,
    max_data_sequences: int = 1000,
    extraction_prefix_len: int = 50,
    extraction_suffix_len: int = 50,
    batch_size: int = 8,
    seed: int | None = None,
) -> AuditReport:
    """Audits `model`, trained on the included canaries of `canary_set` (and possibly other data).

    Args:
        model: the trained causal LM.
        canary_set ([`CanarySet`]): the canaries with their inclusion coins.
        reference_model: the model before training (same tokenizer); turns scores into likelihood ratios.
        claimed_epsilon (`float`, *optional*): the trainer's ε at `delta` (``math.inf`` for a non-private run).
        delta (`float`): δ of the claim, used by the one-run bound.
        significance (`float`): α; the bound holds with probability ≥ 1 - α.
        sampling (`str`, *optional*): the trainer's sampling scheme; under ``"shuffle"`` the claim is for zero-out
            adjacency, which this add/remove test cannot refute (verdict ``"not_comparable"``).
        guesses_per_side (`Sequence[int]`, *optional*): each k means "guess the k highest-scoring canaries as
            members and the k lowest as non-members"; several values are Bonferroni-corrected (α / count) and the
            best bound is reported. Default: one k = max(1, m // 10).
        num_exposure_references (`int`): fresh never-trained canaries added to the held-out ones as references.
        training_sequences, heldout_sequences: token ids (padding removed) of training and held-out sequences for
            membership inference on the data and the extraction test; both are optional.
        max_data_sequences (`int`): at most this many sequences of each set are used (a random subset beyond it).
        extraction_prefix_len (`int`), extraction_suffix_len (`int`): the extraction test's window.
        batch_size (`int`): sequences per forward pass (the logits of a batch are materialised: keep it small for
            long sequences and large vocabularies).
        seed (`int`, *optional*): fixes tie-breaking, reference draws and subsets (tests); OS entropy otherwise.

    Verdict: ``"violation"`` when, for one of the guess settings, the one-run test rejects (claimed ε, δ)-DP at
    level α / count (the p-value at the claimed ε itself, so the root-finder's tolerance plays no part).
    """
    if claimed_epsilon is not None and not claimed_epsilon > 0:  # also refuses NaN
        raise ValueError(f"claimed_epsilon must be > 0 (or math.inf for a non-private run), got {claimed_epsilon}.")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size is not None:
        check_canaries_fit(canary_set, vocab_size)
    is_member = np.array([c.included for c in canary_set.canaries])
    m = is_member.size
    if is_member.all() or not is_member.any():
        raise ValueError(
            f"The audit needs both included and held-out canaries, got {int(is_member.sum())} and "
            f"{int((~is_member).sum())}."
        )
    ks = list(guesses_per_side) if guesses_per_side else [max(1, m // 10)]
    if any(k < 1 or 2 * k > m for k in ks):
        raise ValueError(f"Each number of guesses per side must be in [1, {m // 2}] for {m} canaries, got {ks}.")
    rng = np.random.default_rng(seed)

    # Every canary is scored in one pass, in file order: nothing about a canary's score depends on the coins.
    tokens = [c.token_ids for c in canary_set.canaries]
    logppl = sequence_log_perplexity(model, tokens, batch_size=batch_size)
    scores = -logppl
    if reference_model is not None:
        scores = scores + sequence_log_perplexity(reference_model, tokens, batch_size=batch_size)
    in_scores, out_scores = scores[is_member], scores[~is_member]

    per_k_significance = significance / len(ks)
    audits = [
        one_run_audit(in_scores, out_scores, k, k, delta, per_k_significance, seed=int(rng.integers(2**63)))
        for k in ks
    ]
    best = max(audits, key=lambda a: a.epsilon_lower_bound)
    # None where the test cannot refute the claim: no claim, a non-private run (ε = ∞), or a zero-out (shuffle)
    # claim that this add/remove test does not address. The JSON then never says "refuted" beside "not_comparable".
    comparable = claimed_epsilon is not None and math.isfinite(claimed_epsilon) and sampling != "shuffle"
    refuted = (
        any(
            one_run_p_value(a.num_canaries, a.num_guesses, a.num_correct, claimed_epsilon, delta) <= per_k_significance
            for a in audits
        )
        if comparable
        else None
    )

    num_references, ref_logppl = int((~is_member).sum()), logppl[~is_member]
    if num_exposure_references > 0:
        fresh = canary_set.draw_references(num_exposure_references, seed=int(rng.integers(2**63)))
        ref_logppl = np.concatenate([ref_logppl, sequence_log_perplexity(model, fresh, batch_size=batch_size)])
        num_references += len(fresh)
    exposures = np.asarray(exposure(logppl[is_member], ref_logppl), dtype=np.float64)

    canaries = {
        "num_canaries": m,
        "num_included": int(is_member.sum()),
        "num_held_out": int((~is_member).sum()),
        "canary_length": canary_set.length,
        "membership_inference": _mia_metrics(in_scores, out_scores),
        "one_run": {
            "epsilon_lower_bound": best.epsilon_lower_bound,
            "bonferroni_settings": len(ks),
            "claim_refuted": refuted,
            "per_setting": [a.to_dict() for a in audits],
        },
        "exposure": {
            "num_references": num_references,
            "max_measurable": math.log2(num_references + 1),
            "expected_without_memorisation": expected_exposure_without_memorisation(num_references),
            "mean": float(exposures.mean()),
            "median": float(np.median(exposures)),
            "max": float(exposures.max()),
        },
    }

    training = None if training_sequences is None else _subset(training_sequences, max_data_sequences, rng)
    heldout = None if heldout_sequences is None else _subset(heldout_sequences, max_data_sequences, rng)
    training_data = extraction = None
    if training is not None and heldout is not None:
        training_data = _mia_metrics(
            membership_scores(model, training, reference_model, batch_size),
            membership_scores(model, heldout, reference_model, batch_size),
        )
    sets = {"training": training, "heldout": heldout}
    if any(s is not None for s in sets.values()):
        extraction = {
            name: extraction_test(
                model, seqs, prefix_len=extraction_prefix_len, suffix_len=extraction_suffix_len, batch_size=batch_size
            ).to_dict()
            for name, seqs in sets.items()
            if seqs is not None
        }

    verdict, text = _verdict(best.epsilon_lower_bound, refuted, claimed_epsilon, delta, significance, sampling)
    return AuditReport(
        verdict=verdict,
        verdict_text=text,
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        significance=significance,
        score="log-likelihood ratio to the reference model" if reference_model is not None else "log-likelihood",
        canaries=canaries,
        training_data=training_data,
        extraction=extraction,
        settings={"guesses_per_side": ks, "sampling": sampling, "seed_given": seed is not None},
    )
