"""Tests of `vaultgemma_hf.privacy_eval.stats` against independent oracles.

Oracles: `jax_privacy.auditing` (one-run p-value, ε bound, AUROC), brute force (pair counting, explicit
threshold scans, explicit sorting and loops) and a Monte Carlo simulation of an ε0-DP randomized response.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from vaultgemma_hf.privacy_eval.stats import (
    OneRunAudit,
    exposure,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    roc_auc,
    tpr_at_fpr,
)


@pytest.fixture(scope="module")
def auditing():
    """`jax_privacy.auditing`, the oracle for the one-run audit and the AUROC (tests skip without it)."""
    return pytest.importorskip("jax_privacy.auditing")


def _random_scores(rng: np.random.Generator, n: int, *, ties: bool) -> np.ndarray:
    return rng.integers(0, 6, size=n).astype(float) if ties else rng.normal(size=n)


# ----------------------------------------------------------------------------------------------- one-run audit


def _one_run_grid() -> list[tuple[int, int, int, float, float]]:
    cases = []
    for m, r_frac, v_frac in itertools.product((20, 1000, 10_000), (0.05, 0.5, 1.0), (0.0, 0.5, 0.7, 0.95, 1.0)):
        r = max(1, int(m * r_frac))
        cases += [(m, r, int(r * v_frac), eps, delta) for eps in (0.0, 0.5, 2.0, 6.0) for delta in (0.0, 1e-6, 1e-3)]
    return cases


def test_one_run_p_value_matches_jax_privacy(auditing):
    for m, r, v, eps, delta in _one_run_grid():
        expected = auditing._one_run_p_value(m, r, v, eps, delta)
        got = one_run_p_value(m, r, v, eps, delta)
        assert 0.0 <= got <= 1.0
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-13), (m, r, v, eps, delta)


def test_one_run_p_value_stable_for_large_r(auditing):
    for v, delta in [(73_000, 1e-6), (51_000, 1e-5), (99_000, 0.0)]:
        got = one_run_p_value(100_000, 100_000, v, 1.0, delta)
        assert math.isfinite(got)
        assert got == pytest.approx(auditing._one_run_p_value(100_000, 100_000, v, 1.0, delta), rel=1e-9, abs=1e-13)


def test_one_run_epsilon_lower_bound_matches_jax_privacy(auditing):
    significance = 0.05
    for m, r, v, _, delta in _one_run_grid()[::4]:  # every eps value once per (m, r, v)
        for delta_ in (delta, 0.0):
            expected = auditing._epsilon_one_run(0.0, m, r, v, significance, delta_)
            got = one_run_epsilon_lower_bound(m, r, v, delta_, significance)
            assert got >= 0.0
            assert got == pytest.approx(expected, abs=1e-5), (m, r, v, delta_)
            if got > 1e-4:  # the bound is the rejection boundary of jax_privacy's p-value
                assert auditing._one_run_p_value(m, r, v, got - 1e-4, delta_) <= significance
                assert auditing._one_run_p_value(m, r, v, got + 1e-4, delta_) > significance


@pytest.mark.parametrize(("delta", "significance"), [(0.0, 0.05), (1e-5, 0.05), (1e-3, 0.01)])
def test_one_run_audit_counts_by_explicit_loop(auditing, delta, significance):
    rng = np.random.default_rng(1)
    in_scores, out_scores = rng.normal(0.5, 1.0, size=300), rng.normal(0.0, 1.0, size=200)  # tie-free
    for k_in, k_out in [(50, 0), (0, 40), (100, 100), (300, 200), (1, 0)]:
        pairs = sorted([(s, True) for s in in_scores] + [(s, False) for s in out_scores])
        correct = 0
        for i, (_, member) in enumerate(pairs):
            if i >= len(pairs) - k_in:
                correct += member
            elif i < k_out:
                correct += not member
        audit = one_run_audit(in_scores, out_scores, k_in, k_out, delta, significance, seed=0)
        assert (audit.num_canaries, audit.num_guesses, audit.num_correct) == (500, k_in + k_out, correct)
        assert (audit.num_guesses_in, audit.num_guesses_out) == (k_in, k_out)
        expected = auditing._epsilon_one_run(0.0, 500, k_in + k_out, correct, significance, delta)
        assert audit.epsilon_lower_bound == pytest.approx(expected, abs=1e-5)
    assert audit.to_dict() == dataclasses.asdict(audit)
    assert set(audit.to_dict()) == {f.name for f in dataclasses.fields(OneRunAudit)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        audit.num_correct = 0  # type: ignore[misc]


def test_one_run_audit_ties_are_not_broken_by_labels():
    scores = np.zeros(500)
    assert one_run_audit(scores, scores, 500, 500, delta=1e-5, seed=0).epsilon_lower_bound == 0.0
    audits = [one_run_audit(scores, scores, 500, 500, delta=1e-5, seed=seed) for seed in range(40)]
    fractions = [a.num_correct / a.num_guesses for a in audits]
    # Label-ordered tie-breaking would give 0 or 1 here; a label-independent permutation gives ~1/2.
    assert all(0.44 < f < 0.56 for f in fractions)
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.01)
    # Like any valid level-5% test, a positive bound comes up by chance in ~5% of the seeds (2 of 40 here).
    assert sum(a.epsilon_lower_bound > 0 for a in audits) <= 6
    partial = one_run_audit(scores, scores, 200, 0, delta=0.0, seed=3)
    assert 0.4 < partial.num_correct / 200 < 0.6 and partial.epsilon_lower_bound == 0.0
    assert one_run_audit(scores, scores, 200, 0, delta=0.0, seed=3) == partial  # reproducible with a seed


def _randomized_response_bounds(eps0, m, k_in, k_out, trials, delta, seed):
    """ε lower bounds from an ε0-DP randomized-response 'training run' on m randomly included canaries."""
    rng = np.random.default_rng(seed)
    keep = math.exp(eps0) / (1 + math.exp(eps0))
    bounds = []
    for _ in range(trials):
        member = rng.random(m) < 0.5
        released = np.where(rng.random(m) < keep, member, ~member)  # ε0-DP in each canary
        scores = released + 1e-3 * rng.random(m)  # jitter, independent of membership: tie-free ranking
        if delta > 0:  # (ε0, δ)-DP: with probability δ a canary's membership is released outright
            leaked = rng.random(m) < delta
            scores[leaked] = np.where(member[leaked], 10.0, -10.0)
        audit = one_run_audit(scores[member], scores[~member], k_in, k_out, delta, seed=rng.integers(2**32))
        bounds.append(audit.epsilon_lower_bound)
    return np.array(bounds)


@pytest.mark.parametrize(
    ("eps0", "k_in", "k_out", "delta"),
    # The δ > 0 cases leak a few canaries outright: a bound that ignored the 2mδ term would exceed ε0 in ~55 of
    # the 200 trials there (measured), far above the limit of 20.
    [(1.0, 500, 500, 0.0), (2.0, 100, 0, 0.0), (0.5, 150, 150, 0.0), (1.0, 5, 5, 5e-3), (1.0, 10, 10, 1e-2)],
)
def test_one_run_bound_is_valid_under_randomized_response(eps0, k_in, k_out, delta):
    significance, trials = 0.05, 200
    bounds = _randomized_response_bounds(eps0, 1000, k_in, k_out, trials, delta=delta, seed=int(eps0 * 10) + k_out)
    exceed = int((bounds > eps0).sum())
    assert exceed <= (significance + 0.05) * trials, exceed  # mean <= 10 (sd ~3) if the bound is valid


def test_one_run_bound_is_nearly_tight_for_many_canaries():
    bounds = _randomized_response_bounds(1.0, 5000, 2500, 2500, trials=21, delta=1e-6, seed=7)
    assert 0.6 < np.median(bounds) <= 1.0


# --------------------------------------------------------------------------------------------- AUC and TPR


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_matches_pair_counting_and_mannwhitneyu(ties):
    rng = np.random.default_rng(2 + ties)
    for n_in, n_out in [(1, 1), (7, 13), (150, 80)]:
        s_in, s_out = _random_scores(rng, n_in, ties=ties) + 0.3, _random_scores(rng, n_out, ties=ties)
        pairs = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in s_in for b in s_out)
        got = roc_auc(s_in, s_out)
        assert got == pytest.approx(pairs / (n_in * n_out), abs=1e-12)
        u_statistic = scipy_stats.mannwhitneyu(s_in, s_out, alternative="greater").statistic
        assert got == pytest.approx(u_statistic / (n_in * n_out), abs=1e-12)
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5 and roc_auc([2.0], [1.0]) == 1.0 and roc_auc([0.0], [1.0]) == 0.0


def _roc_points(s_in: np.ndarray, s_out: np.ndarray) -> list[tuple[float, float]]:
    """(FPR, TPR) of "member iff score >= t" for t from +inf down to the smallest score, by explicit counting."""
    thresholds = [math.inf] + sorted(set(s_in.tolist()) | set(s_out.tolist()), reverse=True)
    return [(sum(s >= t for s in s_out) / len(s_out), sum(s >= t for s in s_in) / len(s_in)) for t in thresholds]


def test_roc_auc_against_jax_privacy(auditing):
    # jax_privacy's AUROC is that of the ROC convex hull (randomising between thresholds allowed): it bounds our
    # empirical (Mann-Whitney) AUC from above, with equality exactly when the empirical ROC is already concave.
    rng = np.random.default_rng(4)
    for ties in (False, True):
        for n_in, n_out in [(7, 13), (150, 80)]:
            s_in, s_out = _random_scores(rng, n_in, ties=ties) + 0.3, _random_scores(rng, n_out, ties=ties)
            hull_auc = float(auditing.CanaryScoreAuditor(s_in, s_out).attack_auroc())
            assert roc_auc(s_in, s_out) <= hull_auc + 1e-12
    # Tied scores with a monotone likelihood ratio (binomial levels): concave ROC, so the two AUCs coincide.
    s_in, s_out = rng.binomial(5, 0.7, size=400).astype(float), rng.binomial(5, 0.3, size=300).astype(float)
    points = _roc_points(s_in, s_out)
    slopes = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in itertools.pairwise(points)]
    assert all(a >= b for a, b in itertools.pairwise(slopes)), "precondition: concave empirical ROC"
    expected = float(auditing.CanaryScoreAuditor(s_in, s_out).attack_auroc())
    assert roc_auc(s_in, s_out) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_tpr_at_fpr_matches_threshold_scan(ties):
    rng = np.random.default_rng(5 + ties)
    for n_in, n_out in [(1, 1), (9, 10), (60, 40)]:
        s_in, s_out = _random_scores(rng, n_in, ties=ties) + 0.5, _random_scores(rng, n_out, ties=ties)
        thresholds = sorted(set(s_in.tolist()) | set(s_out.tolist())) + [math.inf]
        for max_fpr in [0.0, 0.01, 0.1, 0.25, 0.5, 1.0] + [k / n_out for k in range(n_out + 1)]:
            best = 0.0
            for t in thresholds:
                fpr = sum(s >= t for s in s_out) / n_out
                if fpr <= max_fpr:
                    best = max(best, sum(s >= t for s in s_in) / n_in)
            assert tpr_at_fpr(s_in, s_out, max_fpr) == pytest.approx(best, abs=1e-12), (n_in, n_out, max_fpr)
    assert tpr_at_fpr([1.0, 2.0], [1.5], 0.0) == 0.5
    assert tpr_at_fpr([1.0], [1.0], 0.5) == 0.0  # only t = +inf has FPR <= 0.5; no randomisation


# -------------------------------------------------------------------------------------------------- exposure


def test_exposure_matches_explicit_rank():
    rng = np.random.default_rng(9)
    refs = rng.integers(0, 20, size=99).astype(float)  # with ties
    canaries = np.array([-1.0, 0.0, 3.0, 7.5, 10.0, 19.0, 25.0])
    got = exposure(canaries, refs)
    assert isinstance(got, np.ndarray) and got.shape == canaries.shape
    for c, e in zip(canaries, got):
        # Canary last among equal log-perplexities (ties count against it); rank is 1-based.
        ordered = sorted([(r, 0) for r in refs] + [(c, 1)])
        rank = ordered.index((c, 1)) + 1
        expected = math.log2(len(ordered)) - math.log2(rank)
        assert e == pytest.approx(expected, abs=1e-12)
        assert exposure(float(c), refs) == pytest.approx(expected, abs=1e-12)
    assert isinstance(exposure(3.0, refs), float)
    assert exposure(-1.0, refs) == pytest.approx(math.log2(100))  # maximum measurable
    assert exposure(25.0, refs) == 0.0
    assert exposure(5.0, [5.0]) == 0.0  # a tie is not evidence of memorisation


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: roc_auc([], [1.0]), "in_scores must be non-empty"),
        (lambda: roc_auc([1.0], np.ones((2, 2))), r"out_scores must be 1-D, got shape \(2, 2\)"),
        (lambda: roc_auc([1.0, np.nan], [1.0]), "in_scores must be finite, got nan at index 1"),
        (lambda: tpr_at_fpr([1.0], [np.inf], 0.1), "out_scores must be finite, got inf"),
        (lambda: tpr_at_fpr([1.0], [1.0], 1.5), r"max_fpr must be in \[0, 1\], got 1.5"),
        (lambda: exposure(1.0, []), "reference_scores must be non-empty"),
        (lambda: exposure(np.nan, [1.0]), "canary_score must be finite, got nan"),
        (lambda: one_run_p_value(10, 5, 6, 1.0, 0.0), r"num_correct \(6\) must be <= num_guesses \(5\)"),
        (lambda: one_run_p_value(10, 11, 6, 1.0, 0.0), r"num_guesses \(11\) must be <= num_canaries \(10\)"),
        (lambda: one_run_p_value(10, 5, -1, 1.0, 0.0), "num_correct must be non-negative, got -1"),
        (lambda: one_run_p_value(10, 5.5, 1, 1.0, 0.0), "num_guesses must be an integer, got 5.5"),
        (lambda: one_run_p_value(10, 5, 1, -0.1, 0.0), "epsilon must be finite and >= 0, got -0.1"),
        (lambda: one_run_p_value(10, 5, 1, 1.0, 1.0), r"delta must be in \[0, 1\), got 1.0"),
        (lambda: one_run_epsilon_lower_bound(10, 5, 1, -1e-6), r"delta must be in \[0, 1\), got -1e-06"),
        (lambda: one_run_epsilon_lower_bound(10, 5, 1, 0.0, 0.0), r"significance must be in \(0, 1\), got 0.0"),
        (lambda: one_run_epsilon_lower_bound(10, 5, 6, 0.0), r"num_correct \(6\) must be <= num_guesses"),
        (lambda: one_run_audit([1.0], [0.0], 2, 1, 0.0), r"must be in \[1, 2\], got 2 \+ 1"),
        (lambda: one_run_audit([1.0], [0.0], 0, 0, 0.0), r"must be in \[1, 2\], got 0 \+ 0"),
        (lambda: one_run_audit([1.0], [0.0], -1, 1, 0.0), "num_guesses_in must be non-negative, got -1"),
        (lambda: one_run_audit([1.0], [0.0], 1, 0, 0.0, significance=1.0), "significance must be in"),
    ],
)
def test_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
