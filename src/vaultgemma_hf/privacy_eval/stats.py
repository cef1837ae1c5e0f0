"""Statistics for empirical privacy audits: pure numpy/scipy, no model code.

Scores follow one convention: a *higher* membership score means "more likely a member" (negate a loss before
passing it in), except in :func:`exposure`, which takes log-perplexities (lower = more memorised).

- :func:`roc_auc` and :func:`tpr_at_fpr` summarise a membership-inference attack (TPR at low FPR as advocated
  by Carlini et al. 2022, "Membership Inference Attacks From First Principles", arXiv:2112.03570).
- :func:`one_run_p_value`, :func:`one_run_epsilon_lower_bound` and :func:`one_run_audit` turn the guesses of
  an attack on randomly included canaries into a statistically valid lower bound on ε, following Steinke, Nasr
  & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846).
- :func:`exposure` is the canary exposure of Carlini et al. 2019, "The Secret Sharer: Evaluating and Testing
  Unintended Memorization in Neural Networks" (USENIX Security 2019, arXiv:1802.08232).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

__all__ = [
    "OneRunAudit",
    "exposure",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "roc_auc",
    "tpr_at_fpr",
]


def _scores(values: Any, name: str) -> np.ndarray:
    """Returns ``values`` as a non-empty, 1-D, finite float array, or raises ``ValueError``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite, got {arr[bad][0]} at index {int(np.argmax(bad))}")
    return arr


def _count(value: Any, name: str) -> int:
    """Returns ``value`` as a non-negative ``int``, or raises ``ValueError``."""
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be non-negative, got {count}")
    return count


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta < 1.0:  # also rejects NaN
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def _check_significance(significance: float) -> None:
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must be in (0, 1), got {significance}")


def roc_auc(in_scores: Any, out_scores: Any) -> float:
    """Area under the ROC curve of the rule "member iff score >= t".

    Equals P[S_in > S_out] + P[S_in = S_out] / 2 for independent uniform draws from the two sets, i.e. the
    Mann-Whitney U statistic divided by ``n_in * n_out``. Computed from mid-ranks in O(n log n).

    Args:
        in_scores: Scores of held-in (member) examples, 1-D.
        out_scores: Scores of held-out (non-member) examples, 1-D.

    Returns:
        The AUC in [0, 1]; 0.5 is chance level.
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    n_in, n_out = s_in.size, s_out.size
    ranks = sps.rankdata(np.concatenate([s_in, s_out]))  # average ranks for ties
    u_statistic = ranks[:n_in].sum() - n_in * (n_in + 1) / 2.0
    return float(u_statistic / (n_in * n_out))


def tpr_at_fpr(in_scores: Any, out_scores: Any, max_fpr: float) -> float:
    """Largest true-positive rate of a threshold rule whose empirical false-positive rate is <= ``max_fpr``.

    Only deterministic rules "member iff score >= t" are considered, for t over all observed scores and
    t = +inf (TPR = FPR = 0). No randomisation between two thresholds is allowed, so the result is the
    ROC *step* curve at ``max_fpr``, not its convex hull (it can be below what a randomised rule achieves).

    Args:
        in_scores: Scores of held-in (member) examples, 1-D.
        out_scores: Scores of held-out (non-member) examples, 1-D.
        max_fpr: Largest admissible FPR, in [0, 1].

    Returns:
        The TPR in [0, 1].
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    thresholds = np.append(np.unique(np.concatenate([s_in, s_out])), np.inf)
    tp = s_in.size - np.searchsorted(np.sort(s_in), thresholds, side="left")
    fp = s_out.size - np.searchsorted(np.sort(s_out), thresholds, side="left")
    admissible = fp / s_out.size <= max_fpr  # always true at t = +inf
    return float(tp[admissible].max() / s_in.size)


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """p-value of the hypothesis "the training run is (ε, δ)-DP" given the guesses of a one-run audit.

    Steinke, Nasr & Jagielski (2023): if each of the m canaries is included independently with probability
    1/2 and an attack makes r guesses of which W are correct, then under (ε, δ)-DP, with p = e^ε / (1 + e^ε),
    β = P[Binomial(r, p) >= v] and α = max_{i=1..v} (P[Binomial(r, p) >= v - i] - β) / i,

        P[W >= v] <= β + 2 m δ α.

    The differences in α are sums of binomial probabilities P[v - i <= X <= v - 1], accumulated in log space
    from the pmf, so there is no cancellation for r up to ~1e5 and beyond.

    Args:
        num_canaries: m, the number of randomly included canaries.
        num_guesses: r <= m, the number of canaries the attack guessed about (did not abstain on).
        num_correct: v <= r, the number of correct guesses.
        epsilon: ε >= 0 of the hypothesis.
        delta: δ in [0, 1) of the hypothesis.

    Returns:
        The p-value, capped at 1.
    """
    m = _count(num_canaries, "num_canaries")
    r = _count(num_guesses, "num_guesses")
    v = _count(num_correct, "num_correct")
    if r > m:
        raise ValueError(f"num_guesses ({r}) must be <= num_canaries ({m})")
    if v > r:
        raise ValueError(f"num_correct ({v}) must be <= num_guesses ({r})")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    _check_delta(delta)
    p = float(special.expit(epsilon))
    beta = float(sps.binom.sf(v - 1, r, p))  # P[X >= v]
    if delta == 0 or beta >= 1.0:
        return min(beta, 1.0)
    # log P[v - i <= X <= v - 1] for i = 1..v, then log α.
    log_pmf = sps.binom.logpmf(np.arange(v - 1, -1, -1), r, p)
    log_partial_sums = np.logaddexp.accumulate(log_pmf)
    log_alpha = np.max(log_partial_sums - np.log(np.arange(1, v + 1)))
    return min(beta + math.exp(log_alpha + math.log(2.0 * m * delta)), 1.0)


def one_run_epsilon_lower_bound(
    num_canaries: int, num_guesses: int, num_correct: int, delta: float, significance: float = 0.05
) -> float:
    """Largest ε such that (ε, δ)-DP is rejected by :func:`one_run_p_value` at level ``significance``.

    The p-value increases with ε, so the rejected set is [0, ε*) and ε* is found by doubling an upper
    bracket and then Brent's method (absolute tolerance 1e-6). With probability >= 1 - significance over
    the canary coins and the training randomness, an (ε, δ)-DP run yields a bound <= its true ε.

    Args:
        num_canaries: m, the number of randomly included canaries.
        num_guesses: r <= m, the number of guesses.
        num_correct: v <= r, the number of correct guesses.
        delta: δ in [0, 1).
        significance: Level of the test, in (0, 1).

    Returns:
        ε* >= 0, or 0.0 when even ε = 0 is not rejected.
    """
    _check_delta(delta)
    _check_significance(significance)

    def margin(eps: float) -> float:  # > 0 where (eps, delta)-DP is rejected
        return significance - one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta)

    if margin(0.0) < 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while margin(hi) >= 0:  # terminates: the p-value reaches 1 once expit(ε) rounds to 1
        lo, hi = hi, 2.0 * hi
    return float(optimize.brentq(margin, lo, hi, xtol=1e-6))


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
    """Result of :func:`one_run_audit`: guess counts and the ε lower bound they give."""

    num_canaries: int
    num_guesses: int
    num_correct: int
    num_guesses_in: int
    num_guesses_out: int
    delta: float
    significance: float
    epsilon_lower_bound: float

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def one_run_audit(
    in_scores: Any,
    out_scores: Any,
    num_guesses_in: int,
    num_guesses_out: int,
    delta: float,
    significance: float = 0.05,
    seed: int | np.random.SeedSequence | None = None,
) -> OneRunAudit:
    """One-run audit (Steinke et al. 2023) from the scores of included and excluded canaries.

    The m = n_in + n_out canaries are pooled; the ``num_guesses_in`` highest-scoring are guessed IN, the
    ``num_guesses_out`` lowest-scoring OUT, and the rest abstained on. Ties are broken by a random permutation
    independent of the labels (never by input order, which would leak membership into the guesses). The bound
    is valid when each canary's inclusion was decided at random (independent fair coins in the paper's
    analysis) before training, and the guess counts were fixed without looking at these labels.

    Args:
        in_scores: Scores of included canaries (higher = more likely member), 1-D.
        out_scores: Scores of excluded canaries, 1-D.
        num_guesses_in: Number of IN guesses (k+).
        num_guesses_out: Number of OUT guesses (k-); k+ + k- must be in [1, m].
        delta: δ in [0, 1) of the hypotheses tested.
        significance: Level of the test, in (0, 1).
        seed: Seed of the tie-breaking permutation; fresh OS entropy when None.

    Returns:
        The :class:`OneRunAudit`.
    """
    s_in, s_out = _scores(in_scores, "in_scores"), _scores(out_scores, "out_scores")
    k_in, k_out = _count(num_guesses_in, "num_guesses_in"), _count(num_guesses_out, "num_guesses_out")
    _check_delta(delta)
    _check_significance(significance)
    m = s_in.size + s_out.size
    if not 1 <= k_in + k_out <= m:
        raise ValueError(f"num_guesses_in + num_guesses_out must be in [1, {m}], got {k_in} + {k_out}")
    scores = np.concatenate([s_in, s_out])
    is_member = np.concatenate([np.ones(s_in.size, dtype=bool), np.zeros(s_out.size, dtype=bool)])
    tie_break = np.random.default_rng(seed).permutation(m)
    order = np.lexsort((tie_break, scores))  # ascending by score, ties in random order
    num_correct = int(is_member[order[m - k_in :]].sum() + (~is_member[order[:k_out]]).sum())
    bound = one_run_epsilon_lower_bound(m, k_in + k_out, num_correct, delta, significance)
    return OneRunAudit(m, k_in + k_out, num_correct, k_in, k_out, float(delta), float(significance), bound)


def exposure(canary_score: Any, reference_scores: Any) -> float | np.ndarray:
    """Exposure of a canary (Carlini et al. 2019) estimated by its rank among reference candidates.

    Inputs are log-perplexities (lower = more likely under the model). With R the references plus the canary,
    rank = 1 + #{references with log-perplexity <= the canary's} (ties count against the canary, so the
    estimate is conservative) and exposure = log2 |R| - log2 rank. The largest measurable value is
    log2(len(reference_scores) + 1); 0 means the canary looks no more likely than any reference.

    Args:
        canary_score: Log-perplexity of the canary; an array gives one exposure per element (same shape).
        reference_scores: Log-perplexities of the reference candidates (not inserted in training), 1-D.

    Returns:
        The exposure in bits: a float for a scalar ``canary_score``, else an array.
    """
    refs = np.sort(_scores(reference_scores, "reference_scores"))
    canary = np.asarray(canary_score, dtype=np.float64)
    if canary.size == 0:
        raise ValueError("canary_score must be non-empty")
    if not np.isfinite(canary).all():
        raise ValueError(f"canary_score must be finite, got {canary[~np.isfinite(canary)].flat[0]}")
    rank = 1 + np.searchsorted(refs, canary, side="right")
    result = np.log2(refs.size + 1) - np.log2(rank)
    return float(result) if result.ndim == 0 else result
