"""Independent oracles for the privacy audit's statistics and verdict (beyond `jax_privacy`, which the one-run
code mirrors line by line and so cannot catch a misreading of the paper they share).

Oracles: the one-run theorem of Steinke, Nasr & Jagielski (2023) evaluated literally in 50-digit mpmath (max over
i = 1..m, not 1..v); the exact size of the one-run test by brute-force enumeration of every coin vector and every
output of an (ε0, δ0)-DP mechanism for m = 8 canaries; the exact mean of a uniform rank for exposure; explicit
counting for TPR at FPR; a lookup-table language model whose greedy continuation is known for the extraction test.
"""

from __future__ import annotations

import itertools
import math

import mpmath
import numpy as np
import pytest
import torch

from vaultgemma_hf.privacy_eval import extraction_test, make_canaries, run_privacy_audit
from vaultgemma_hf.privacy_eval.audit import _mia_metrics, expected_exposure_without_memorisation
from vaultgemma_hf.privacy_eval.model_card import render_audit_section
from vaultgemma_hf.privacy_eval.stats import exposure, one_run_epsilon_lower_bound, one_run_p_value

mpmath.mp.dps = 50


def _theorem_p_value(m: int, r: int, v: int, eps: float, delta: float) -> mpmath.mpf:
    """P[W >= v] <= f(v) + 2 m δ max_{i=1..m} (f(v - i) - f(v)) / i, f(u) = P[Binomial(r, e^ε/(1+e^ε)) >= u]."""
    p = mpmath.e ** mpmath.mpf(eps) / (1 + mpmath.e ** mpmath.mpf(eps))
    pmf = [mpmath.binomial(r, j) * p**j * (1 - p) ** (r - j) for j in range(r + 1)]

    def f(u: int) -> mpmath.mpf:
        return mpmath.fsum(pmf[max(u, 0) :]) if u <= r else mpmath.mpf(0)

    alpha = max(((f(v - i) - f(v)) / i for i in range(1, m + 1)), default=mpmath.mpf(0))
    return min(f(v) + 2 * m * mpmath.mpf(delta) * alpha, mpmath.mpf(1))


def test_one_run_p_value_is_the_theorem_evaluated_in_high_precision():
    for m, r, v, eps, delta in [
        (8, 8, 8, 1.0, 0.02),
        (8, 4, 3, 0.5, 0.0),
        (50, 20, 17, 1.3, 1e-3),
        (50, 20, 0, 1.3, 1e-3),
        (200, 40, 40, 3.0, 1e-5),
        (200, 200, 130, 0.2, 1e-4),
        (1000, 30, 25, 0.0, 0.0),
    ]:
        expected = float(_theorem_p_value(m, r, v, eps, delta))
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9, abs=1e-15), (m, r, v)
    # δ enters as 2·m·δ with m the number of canaries (not the r guesses): the excess over δ = 0 is linear in m.
    excess = [one_run_p_value(m, 20, 17, 1.0, 1e-4) - one_run_p_value(m, 20, 17, 1.0, 0.0) for m in (20, 40, 80)]
    assert excess[1] == pytest.approx(2 * excess[0], rel=1e-9) and excess[2] == pytest.approx(4 * excess[0], rel=1e-9)


def test_one_run_bound_is_the_largest_rejected_epsilon_on_a_grid():
    # The bound is sup{ε : p(ε) <= α}; the p-value must be non-decreasing in ε (the search assumes it).
    grid = np.linspace(0.0, 8.0, 801)
    for m, r, v, delta in [(100, 20, 20, 1e-5), (1000, 200, 180, 1e-5), (1000, 200, 150, 1e-3), (50, 10, 9, 0.01)]:
        p = np.array([one_run_p_value(m, r, v, e, delta) for e in grid])
        assert (np.diff(p) >= -1e-15).all(), (m, r, v, delta)
        rejected = grid[p <= 0.05]
        bound = one_run_epsilon_lower_bound(m, r, v, delta, 0.05)
        expected = rejected.max() if rejected.size else 0.0
        assert expected - 1e-6 <= bound <= expected + grid[1] + 1e-6, (m, r, v, delta)


def _exact_size(m, k, eps0, delta0, alpha, p_value):
    """Exact P[p_value(W) <= α] for the top-k / bottom-k guesser on an (ε0, δ0)-DP mechanism, by enumeration.

    Each canary independently: with probability δ0 its membership is released outright (score ±10), else by
    randomized response (score = the bit, right with probability e^ε0 / (1 + e^ε0)). A deterministic index jitter
    (independent of the coins) makes the ranking tie-free, so every (coins, output) pair gives one W.
    """
    keep = math.exp(eps0) / (1 + math.exp(eps0))
    outputs = np.array(list(itertools.product((0, 1, 2), repeat=m)), dtype=np.int8)  # 0/1: RR bit, 2: leak
    jitter = np.arange(m) / (10.0 * m)
    p_of_w = np.array([p_value(m, 2 * k, w) for w in range(2 * k + 1)])
    size = 0.0
    for coins in itertools.product((0, 1), repeat=m):
        s = np.array(coins, dtype=np.int8)
        prob = np.where(outputs == 2, delta0, (1 - delta0) * np.where(outputs == s, keep, 1 - keep)).prod(axis=1)
        score = np.where(outputs == 2, np.where(s == 1, 10.0, -10.0), outputs.astype(float)) + jitter
        order = np.argsort(score, axis=1)
        correct = s[order[:, m - k :]].sum(axis=1) + (1 - s[order[:, :k]]).sum(axis=1)
        size += float((prob * (p_of_w[correct] <= alpha)).sum()) / 2**m
    return size


@pytest.mark.parametrize(
    ("k", "eps0", "delta0", "alpha"),
    [(4, 1.0, 0.0, 0.1), (4, 0.5, 0.0, 0.5), (4, 1.0, 0.02, 0.3), (3, 0.5, 0.02, 0.4)],
)
def test_one_run_test_has_exact_size_at_most_alpha_by_enumeration(k, eps0, delta0, alpha):
    # Exact, no Monte Carlo: a valid test rejects a true (ε0, δ0) claim with probability <= α. The sizes are far
    # from 0 here (0.04 to 0.29), so an off-by-one in v (P[X > v] for P[X >= v]) pushes them above α.
    size = _exact_size(8, k, eps0, delta0, alpha, lambda m, r, w: one_run_p_value(m, r, w, eps0, delta0))
    assert 0.0 < size <= alpha
    from scipy import stats as sps

    p = math.exp(eps0) / (1 + math.exp(eps0))
    off_by_one = _exact_size(8, k, eps0, delta0, alpha, lambda m, r, w: float(sps.binom.sf(w, r, p)))
    assert off_by_one > size  # the enumeration can tell a wrong statistic apart


# -------------------------------------------------------------------------------- exposure, TPR at FPR


def test_expected_exposure_is_the_mean_over_a_uniform_rank():
    for n in (1, 2, 7, 100, 999):
        ranks = np.arange(1, n + 2)  # the canary among n references and itself: rank 1..n+1, uniform
        exact = float(np.mean(np.log2(n + 1) - np.log2(ranks)))
        assert expected_exposure_without_memorisation(n) == pytest.approx(exact, rel=1e-12)
    assert expected_exposure_without_memorisation(10**6) == pytest.approx(math.log2(math.e), abs=1e-4)
    # Monte Carlo with continuous i.i.d. scores (no memorisation): the sample mean of 4000 exposures has a standard
    # error of ~0.02 bits; the tolerance 0.1 is 5 standard errors (false-failure rate < 1e-6).
    rng = np.random.default_rng(0)
    refs = rng.normal(size=199)
    assert float(np.mean(exposure(rng.normal(size=4000), refs))) == pytest.approx(
        expected_exposure_without_memorisation(199), abs=0.1
    )


def test_tpr_at_fpr_is_reported_only_where_a_false_positive_is_allowed():
    rng = np.random.default_rng(1)
    for n_out in (9, 10, 99, 100, 999, 1000):
        metrics = _mia_metrics(rng.normal(1.0, size=50), rng.normal(size=n_out))
        for level, value in metrics["tpr_at_fpr"].items():
            allowed_false_positives = math.floor(float(level) * n_out + 1e-9)  # exact for these n
            assert (value is None) == (allowed_false_positives == 0), (n_out, level)


# ------------------------------------------------------------------------------------------- extraction


class _CountingLM(torch.nn.Module):
    """A causal LM whose greedy next token is always (previous token + 1) mod V."""

    def __init__(self, vocab_size: int = 50):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab_size, self.vocab_size).float() * 10.0
        return type("Out", (), {"logits": logits + self.weight})()


def test_extraction_matches_the_model_card_definition():
    def counting(start: int, n: int) -> list[int]:
        return [(start + i) % 50 for i in range(n)]

    model = _CountingLM()
    exact = counting(3, 100)  # exactly prefix + suffix: tested, memorised
    longer = counting(7, 130)  # only the first 100 tokens count
    longer[110] = 0  # a difference beyond the window does not matter
    short = counting(1, 99)  # one token short: skipped, not counted as a miss
    last_token_off = counting(5, 100)
    last_token_off[99] = (last_token_off[99] + 1) % 50  # 1 edit in 50: approximate, not exact
    five_off = counting(9, 100)
    for j in range(60, 100, 8):  # 5 substitutions = 10% of 50: approximate
        five_off[j] = (five_off[j] + 2) % 50
    six_off = counting(11, 100)
    for j in range(55, 100, 8):  # 6 substitutions: neither
        six_off[j] = (six_off[j] + 2) % 50
    result = extraction_test(model, [exact, longer, short, last_token_off, five_off, six_off])
    assert (result.prefix_len, result.suffix_len) == (50, 50)
    assert (result.num_tested, result.num_skipped) == (5, 1)
    assert (result.exact_matches, result.approximate_matches) == (2, 4)


# ------------------------------------------------------------------------------------------------ verdict


class _MemorisingLM(torch.nn.Module):
    """Predicts every next token of the sequences it memorised (by their first two tokens), nothing otherwise."""

    def __init__(self, memorised: list[tuple[int, ...]], vocab_size: int):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab_size})()
        self.table = {seq[:2]: seq for seq in memorised}
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.config.vocab_size)
        for row in range(batch):
            seq = self.table.get(tuple(input_ids[row, :2].tolist()))
            if seq is not None:
                nxt = torch.tensor(list(seq[1:width]) + [0])
                logits[row, torch.arange(width), nxt] = 20.0
        return type("Out", (), {"logits": logits + self.weight})()


def test_claim_refuted_is_not_reported_where_the_test_cannot_refute():
    canary_set = make_canaries(60, 97, length=6, excluded_token_ids=(0, 1, 2, 3), seed=3)
    model = _MemorisingLM([c.token_ids for c in canary_set.included], 97)
    m, k = 60, 6
    # Oracle: every guess is right (a perfect memoriser), so the claim (0.5, 1e-5) is refuted iff the theorem's
    # p-value at W = r = 2k, in high precision, is <= α.
    assert float(_theorem_p_value(m, 2 * k, 2 * k, 0.5, 1e-5)) <= 0.05
    common = {"claimed_epsilon": 0.5, "delta": 1e-5, "guesses_per_side": [k], "seed": 0}
    report = run_privacy_audit(model, canary_set, **common)
    assert report.canaries["one_run"]["per_setting"][0]["num_correct"] == 2 * k
    assert report.verdict == "violation" and report.canaries["one_run"]["claim_refuted"] is True
    # A zero-out (shuffle) claim is not tested by add/remove canaries: no "refuted" beside "not_comparable".
    shuffled = run_privacy_audit(model, canary_set, sampling="shuffle", **common)
    assert shuffled.verdict == "not_comparable" and shuffled.canaries["one_run"]["claim_refuted"] is None
    for claim, verdict in ((math.inf, "non_private"), (None, "no_claim")):
        other = run_privacy_audit(model, canary_set, **{**common, "claimed_epsilon": claim})
        assert other.verdict == verdict and other.canaries["one_run"]["claim_refuted"] is None


def test_model_card_says_n_a_only_where_a_tpr_is_not_measurable():
    canary_set = make_canaries(60, 97, length=6, excluded_token_ids=(0, 1, 2, 3), seed=3)
    model = _MemorisingLM([c.token_ids for c in canary_set.included], 97)
    report = run_privacy_audit(model, canary_set, claimed_epsilon=1.0, seed=0)
    # ~30 held-out canaries: TPR at 1% and 0.1% are not measurable (None), and the note explains the "n/a".
    assert report.canaries["num_held_out"] < 100
    card = render_audit_section(report)
    assert "n/a / n/a (n/a: fewer held-out canaries than 1/FPR)" in card
    report.canaries["membership_inference"]["tpr_at_fpr"] = {"0.1": 0.5, "0.01": 0.25, "0.001": 0.125}
    assert "n/a" not in render_audit_section(report)
