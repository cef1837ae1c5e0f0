"""Privacy accounting for DP-SGD: the single accountant of vaultgemma-hf (trainer and planner share it).

Every ε reported by this module comes from Google's `dp_accounting` library: PLD (privacy loss distributions,
tight, default) or RDP (Rényi DP, faster, looser). The neighbouring relation is add/remove of one *privacy
unit* (one training sequence, see the trainer docs) for the Poisson schemes, and zero-out of one unit for
``"shuffle"`` (see :func:`make_dp_event`). Three sampling schemes are supported:

- ``"poisson"``: every example joins each logical batch independently with probability ``q``. Accounted as
  ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` composed ``T`` times (amplification by subsampling).
- ``"truncated_poisson"``: Poisson sampling followed by a fixed physical cap ``max_batch_size`` (examples in
  excess are dropped). Accounted with ``TruncatedSubsampledGaussianDpEvent`` (PLD only; `dp_accounting`'s RDP
  accountant does not support it).
- ``"shuffle"``: fixed-size shuffled batches, each example used at most once per epoch. No amplification is
  claimed: see :func:`make_dp_event`.

Pure functions (:func:`make_dp_event`, :func:`compute_epsilon`, :func:`calibrate_noise`) are separated from the
stateful per-run :class:`PrivacyAccountant`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import threading
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version

import dp_accounting
from dp_accounting import pld, rdp

SAMPLING_SCHEMES = ("poisson", "truncated_poisson", "shuffle")
ACCOUNTANTS = ("pld", "rdp")

DEFAULT_PLD_DISCRETIZATION = 1e-4
"""`dp_accounting`'s default PLD value discretisation interval; every ε we report uses it unless told."""

COARSE_PLD_DISCRETIZATIONS = (1e-2, 3e-3, 1e-3)
"""Discretisations used only to *predict* σ during calibration (never to report ε)."""

MIN_NOISE_MULTIPLIER = 0.1
"""Calibration does not explore σ below this: if σ = 0.1 already meets the target it is returned."""

MAX_NOISE_MULTIPLIER = 1e6
"""Calibration gives up above this σ and raises :class:`UnreachableEpsilonError`."""

STATE_FORMAT_VERSION = 1

_MIN_SECANT_SPAN = 2e-3
"""Secant slopes are measured only over >= 0.2% in σ: closer points mostly see PLD discretisation steps."""


class UnreachableEpsilonError(ValueError):
    """The target ε cannot be met with σ ≤ :data:`MAX_NOISE_MULTIPLIER` for the given sampling and steps.

    Attributes:
        target_epsilon: The ε that was asked for.
        best_epsilon: The ε reached at σ = :data:`MAX_NOISE_MULTIPLIER` (the nearest feasible target).
    """

    def __init__(self, message: str, *, target_epsilon: float, best_epsilon: float):
        super().__init__(message)
        self.target_epsilon = target_epsilon
        self.best_epsilon = best_epsilon


@dataclasses.dataclass(frozen=True)
class NoiseCalibration:
    """Result of :func:`calibrate_noise`.

    Attributes:
        noise_multiplier: The calibrated σ.
        epsilon: ε at that σ, computed by the requested accountant at its default precision.
        evaluations: Number of ε evaluations at the reporting precision.
        coarse_evaluations: Number of cheaper (coarse PLD) evaluations used to predict σ.
        slope: d log ε / d log σ measured near the answer (a warm start for similar configurations), or None.
        pld_discretization: The PLD value discretisation interval of ``epsilon`` (PLD accountant only).
    """

    noise_multiplier: float
    epsilon: float
    evaluations: int
    coarse_evaluations: int
    slope: float | None = None
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION


def dp_accounting_version() -> str:
    """Installed `dp_accounting` version (recorded in checkpoints and plans)."""
    try:
        return version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover - only for unusual installs
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _as_int(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _as_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN.")
    return value


def _check_noise_multiplier(noise_multiplier) -> float:
    noise_multiplier = _as_float(noise_multiplier, "noise_multiplier")
    if not 0.0 <= noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}.")
    return noise_multiplier


def _check_sampling_rate(sampling_rate) -> float:
    sampling_rate = _as_float(sampling_rate, "sampling_rate")
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
    return sampling_rate


def _check_delta(delta) -> float:
    delta = _as_float(delta, "delta")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    return delta


def _check_epsilon(epsilon) -> float:
    epsilon = _as_float(epsilon, "target_epsilon")
    if not 0.0 < epsilon < math.inf:
        raise ValueError(f"target_epsilon must be finite and > 0, got {epsilon}.")
    return epsilon


def _check_pld_discretization(pld_discretization) -> float:
    pld_discretization = _as_float(pld_discretization, "pld_discretization")
    if not 0.0 < pld_discretization <= 0.1:
        raise ValueError(f"pld_discretization must be in (0, 0.1], got {pld_discretization}.")
    return pld_discretization


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    return accountant


@dataclasses.dataclass(frozen=True)
class _Sampling:
    """Validated sampling description (everything but σ and T)."""

    scheme: str
    sampling_rate: float
    dataset_size: int | None
    max_batch_size: int | None
    logical_batch_size: int | None

    def epochs(self, steps: int) -> int:
        """Number of passes over the data started within ``steps`` shuffled steps (shuffle only)."""
        return shuffle_epochs(steps, self.dataset_size, self.logical_batch_size)


def shuffle_epochs(steps: int, dataset_size: int, logical_batch_size: int) -> int:
    """Shuffled epochs started within ``steps`` steps: ``ceil(steps / floor(N / L))``.

    An epoch of the shuffle sampler is a fresh random permutation cut into ``floor(N / L)`` batches of exactly
    ``L`` units (the remaining ``N mod L`` units sit that epoch out), so a run of ``steps`` steps starts
    ``ceil(steps / floor(N / L))`` epochs, and a unit can be used once in each of them. This is the sampler's
    :func:`vaultgemma_hf.dp.sampling.steps_per_epoch` (kept here as pure math; a test runs the real sampler against
    it).

    Args:
        steps: Number of logical steps T (>= 0).
        dataset_size: N, the number of privacy units.
        logical_batch_size: L, the fixed batch size (<= N).

    Returns:
        The number of epochs started (0 for 0 steps).

    Raises:
        ValueError: If an argument is out of range.
    """
    steps = _as_int(steps, "steps", minimum=0)
    dataset_size = _as_int(dataset_size, "dataset_size", minimum=1)
    logical_batch_size = _as_int(logical_batch_size, "logical_batch_size", minimum=1)
    if logical_batch_size > dataset_size:
        raise ValueError(f"logical_batch_size ({logical_batch_size}) exceeds dataset_size ({dataset_size}).")
    return -(-steps // (dataset_size // logical_batch_size))


def _check_sampling(
    sampling: str,
    sampling_rate,
    dataset_size,
    max_batch_size,
    logical_batch_size,
) -> _Sampling:
    if sampling not in SAMPLING_SCHEMES:
        raise ValueError(f"sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}.")
    sampling_rate = _check_sampling_rate(sampling_rate)
    if dataset_size is not None:
        dataset_size = _as_int(dataset_size, "dataset_size", minimum=1)
    if max_batch_size is not None:
        max_batch_size = _as_int(max_batch_size, "max_batch_size", minimum=1)
    if logical_batch_size is not None:
        logical_batch_size = _as_int(logical_batch_size, "logical_batch_size", minimum=1)
    if sampling == "truncated_poisson" and (dataset_size is None or max_batch_size is None):
        raise ValueError("sampling='truncated_poisson' needs dataset_size and max_batch_size (the physical cap).")
    if sampling == "shuffle" and (dataset_size is None or logical_batch_size is None):
        raise ValueError("sampling='shuffle' needs dataset_size and logical_batch_size.")
    if dataset_size is not None and logical_batch_size is not None:
        if logical_batch_size > dataset_size:
            raise ValueError(f"logical_batch_size ({logical_batch_size}) exceeds dataset_size ({dataset_size}).")
        # The expected batch of Poisson sampling is q * N; a rate that does not match the batch is a wiring bug. The
        # samplers draw with q = L / N exactly, so only float round-off is tolerated: a rate even one unit (1/N)
        # low would under-report ε (by up to 2x for L = 2).
        if abs(sampling_rate * dataset_size - logical_batch_size) > 1e-9 * logical_batch_size:
            raise ValueError(
                f"sampling_rate={sampling_rate} does not match logical_batch_size / dataset_size = "
                f"{logical_batch_size}/{dataset_size} = {logical_batch_size / dataset_size:.6g}."
            )
    if max_batch_size is not None and dataset_size is not None and max_batch_size > dataset_size:
        raise ValueError(f"max_batch_size ({max_batch_size}) exceeds dataset_size ({dataset_size}).")
    return _Sampling(sampling, sampling_rate, dataset_size, max_batch_size, logical_batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Events and ε
# ----------------------------------------------------------------------------------------------------------------


def _event(noise_multiplier: float, steps: int, spec: _Sampling) -> dp_accounting.DpEvent:
    if spec.scheme == "poisson":
        step = dp_accounting.PoissonSampledDpEvent(spec.sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        return dp_accounting.SelfComposedDpEvent(step, steps)
    if spec.scheme == "truncated_poisson":
        step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=spec.dataset_size,
            sampling_probability=spec.sampling_rate,
            truncated_batch_size=spec.max_batch_size,
            noise_multiplier=noise_multiplier,
        )
        return dp_accounting.SelfComposedDpEvent(step, steps)
    # shuffle: one Gaussian mechanism of sensitivity C per (started) epoch, no amplification.
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), spec.epochs(steps))


def make_dp_event(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    *,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
    logical_batch_size: int | None = None,
) -> dp_accounting.DpEvent:
    """Builds the `dp_accounting` event of ``steps`` DP-SGD steps.

    - ``"poisson"``: ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``.
    - ``"truncated_poisson"``: ``SelfComposedDpEvent(TruncatedSubsampledGaussianDpEvent(N, q, max_batch_size, σ),
      steps)``: Poisson sampling whose batches are cut to ``max_batch_size`` (a random subset is kept).
    - ``"shuffle"``: fixed-size shuffled batches where every example is used at most once per epoch. This is the
      honest, amplification-free bound: an epoch is a random permutation cut into ``floor(N / B)`` batches of
      ``B`` (the rest sits the epoch out), so ``steps`` steps start ``epochs = ceil(steps / floor(N / B))``
      passes (:func:`shuffle_epochs`); in each pass an example contributes to at most one noisy sum
      (sensitivity C, noise σC), so the run is the composition of ``epochs`` Gaussian mechanisms,
      ``SelfComposedDpEvent(GaussianDpEvent(σ), epochs)``. A partly run epoch counts as a whole one. No privacy
      amplification by shuffling or by batching is claimed. The sensitivity C holds for the *zero-out*
      relation (one example replaced by a null example with zero gradient: N and everyone else's batches are
      unchanged). It does not give add/remove DP (removing an example shifts the other examples between
      batches), and replacing one example by another has sensitivity 2C (zero-out (ε, δ) implies only
      (2ε, (1 + e^ε)δ) for replace-one).

    Args:
        noise_multiplier: σ, the noise standard deviation in units of the clipping norm C.
        sampling_rate: q, the probability that an example joins a logical batch (``B / N``).
        steps: Number of logical (optimizer) steps.
        sampling: One of :data:`SAMPLING_SCHEMES`.
        dataset_size: N, number of privacy units (needed by ``"truncated_poisson"`` and ``"shuffle"``).
        max_batch_size: Physical cap of ``"truncated_poisson"`` batches.
        logical_batch_size: B, the expected (Poisson) or fixed (shuffle) number of examples per step.

    Returns:
        The composed `dp_accounting.DpEvent`.

    Raises:
        ValueError: If an argument is out of range or the scheme lacks a required size.
    """
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    steps = _as_int(steps, "steps", minimum=0)
    spec = _check_sampling(sampling, sampling_rate, dataset_size, max_batch_size, logical_batch_size)
    return _event(noise_multiplier, steps, spec)


def _epsilon(
    noise_multiplier: float,
    steps: int,
    delta: float,
    spec: _Sampling,
    accountant: str,
    pld_discretization: float,
) -> float:
    """ε of validated arguments, straight from `dp_accounting`."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf  # non-private control: no guarantee at all
    event = _event(noise_multiplier, steps, spec)
    if accountant == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=pld_discretization)
        extended, roundoff = _composition_precision(delta, steps)
        with _extended_precision_composition() if extended else contextlib.nullcontext():
            acc.compose(event)
        # The composed PMF carries absolute errors of about T x (unit round-off) in either direction: reading ε off
        # at δ minus a multiple of that makes the reported ε an upper bound rather than an estimate.
        return float(acc.get_epsilon(delta - composition_error_margin(steps, roundoff)))
    else:
        if spec.scheme == "truncated_poisson":
            raise ValueError(
                "accountant='rdp' does not support sampling='truncated_poisson' (dp_accounting's RDP accountant "
                "has no TruncatedSubsampledGaussianDpEvent); use accountant='pld'."
            )
        acc = rdp.RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
    logical_batch_size: int | None = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
    """ε spent by ``steps`` DP-SGD steps at the given δ.

    Args:
        noise_multiplier: σ (``0`` is a non-private control and gives ``inf``).
        sampling_rate: q in (0, 1].
        steps: Number of logical steps (``0`` gives ``0.0``).
        delta: δ in (0, 1).
        accountant: ``"pld"`` (tight, default) or ``"rdp"`` (faster, an upper bound on the PLD value).
        sampling: One of :data:`SAMPLING_SCHEMES`; see :func:`make_dp_event`.
        dataset_size: N (required by ``"truncated_poisson"`` and ``"shuffle"``).
        max_batch_size: Physical cap (``"truncated_poisson"``).
        logical_batch_size: B (required by ``"shuffle"``).
        pld_discretization: PLD value discretisation interval (smaller is tighter and slower).

    Returns:
        ε as a float (``inf`` when σ = 0 and steps > 0).

    Raises:
        ValueError: On invalid arguments or an unsupported accountant/sampling pair.
    """
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    steps = _as_int(steps, "steps", minimum=0)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    pld_discretization = _check_pld_discretization(pld_discretization)
    spec = _check_sampling(sampling, sampling_rate, dataset_size, max_batch_size, logical_batch_size)
    return _epsilon(noise_multiplier, steps, delta, spec, accountant, pld_discretization)


def default_delta(dataset_size: int) -> float:
    """The δ used when none is given (planner and trainer alike): ``min(1e-5, 1 / (10 N))`` for N privacy units.

    Safely below 1/N: at δ >= 1/N a mechanism that publishes one random record in full is (0, δ)-DP.
    """
    dataset_size = _as_int(dataset_size, "dataset_size", minimum=1)
    return min(1e-5, 1.0 / (10.0 * dataset_size))


PLD_NOISE_FLOOR_PER_STEP = 1e-14
"""δ at or below ``steps ×`` this is where dp_accounting's float64 PLD ε becomes numerically unreliable."""

PLD_EXTENDED_FLOOR_PER_STEP = 1e-17
"""The same floor for the extended-precision (80-bit) composition used below ``PLD_NOISE_FLOOR_PER_STEP``."""

PLD_FLOAT64_EXACT_PER_STEP = 1e-10
"""δ above ``steps ×`` this is where the float64 composition's error in ε is below ~1e-7 relative (measured against
a direct-convolution oracle); at or below it, ε is composed in 80-bit extended precision where available."""

COMPOSITION_ERROR_FACTOR = 10.0
"""ε is read off at ``δ - COMPOSITION_ERROR_FACTOR × T × u`` (u: unit round-off of the composition)."""

_EXTENDED_LOCK = threading.Lock()


def composition_error_margin(steps: int, roundoff: float) -> float:
    """The δ set aside for the round-off of an FFT self-composition of ``steps`` steps.

    dp_accounting composes T steps as one FFT raised to the power T, so every entry of the composed PMF carries an
    absolute error of about ``T × u`` (u: the unit round-off of the arithmetic), in either direction. Measured
    against a direct (FFT-free, non-negative, so relatively exact) convolution of the same one-step PMF, the
    error in δ(ε) stays below ``T × u``; ε read off at ``δ - 10 T u`` is therefore an upper bound on the ε of the
    discretised PLD, where ε read off at δ was measured up to 5.5e-4 (relative) too *small* at
    δ = 1.5 T × 1e-14 in float64 and 3.8e-5 too small at δ = 1.25 T × 1e-17 in 80-bit precision.

    Args:
        steps: T, the number of self-composed steps.
        roundoff: u, the unit round-off of the composition's arithmetic.

    Returns:
        The margin in δ.
    """
    return COMPOSITION_ERROR_FACTOR * steps * roundoff


def _composition_precision(delta: float, steps: int) -> tuple[bool, float]:
    """``(extended, unit round-off)`` of the PLD composition used for ε at ``delta`` after ``steps`` steps.

    Float64 above ``T × PLD_FLOAT64_EXACT_PER_STEP``; below it 80-bit extended precision where the platform has
    it, down to ``T × PLD_EXTENDED_FLOOR_PER_STEP``; float64 (with its larger margin) down to
    ``T × PLD_NOISE_FLOOR_PER_STEP`` where it has not.

    Raises:
        ValueError: Where no composition is precise enough for ``delta``.
    """
    import numpy as np

    float64_roundoff = float(np.finfo(np.float64).eps)
    if delta > steps * PLD_FLOAT64_EXACT_PER_STEP:
        return False, float64_roundoff
    if not _extended_precision_available() and delta > steps * PLD_NOISE_FLOOR_PER_STEP:
        return False, float64_roundoff
    _check_extended_precision(delta, steps)
    return True, float(np.finfo(np.longdouble).eps)


def pld_precision_warning(delta: float, steps: int) -> str | None:
    """A note when ε at this (δ, T) is beyond the precision of dp_accounting's float64 PLD composition, else None.

    dp_accounting composes T steps as one FFT raised to the power T, so the composed PMF carries absolute errors of
    about T × 1e-16 (float64 round-off amplified T times). ε is read off where the PMF's tail mass is δ, so once
    that error reaches ~1% of δ (δ <= T × 1e-14) the float64 ε is wrong, in both directions: measured at
    q = 4.1e-5, T = 100,582, δ = 7.9e-12 it is 1.98 / 2.04 / 2.05 / 6.83 for σ = 0.621 / 0.622 / 0.623 / 0.624,
    where an 80-bit computation gives 2.132 / 2.113 / 2.094 / 2.075 (see docs/source/en/planning.md). There
    `compute_epsilon` (and so calibration, the planner and the trainer) compose in 80-bit precision, which holds
    down to δ = T × 1e-17, and refuse beyond it. (They already switch to 80-bit below δ = T ×
    ``PLD_FLOAT64_EXACT_PER_STEP``, where float64 is merely a little imprecise; this note is for the range where it
    is wrong.)
    """
    if steps >= 1 and delta <= steps * PLD_NOISE_FLOOR_PER_STEP:
        return (
            f"delta={delta:g} over {steps:,} steps is below the precision of dp_accounting's float64 PLD "
            f"composition (delta <= T x {PLD_NOISE_FLOOR_PER_STEP:g}), which gets epsilon wrong there in either "
            "direction; epsilon is composed in 80-bit extended precision instead (exact to the PLD's own "
            "discretisation, about 1.5-2x slower)."
        )
    return None


def _extended_precision_available() -> bool:
    """True where numpy's long double has 64-bit mantissas and dp_accounting composes through `self_convolve`."""
    import numpy as np
    from dp_accounting.pld import common

    return np.finfo(np.longdouble).eps <= 1.1e-19 and callable(getattr(common, "self_convolve", None))


def _check_extended_precision(delta: float, steps: int) -> None:
    if not _extended_precision_available():
        raise ValueError(
            f"delta={delta:g} over {steps:,} steps is below the precision of dp_accounting's float64 PLD "
            f"composition (delta <= T x {PLD_NOISE_FLOOR_PER_STEP:g}), and 80-bit extended precision is not "
            "available on this platform (numpy long double is float64 here), so no reliable PLD epsilon can be "
            "given. Use a larger delta, fewer steps, or accountant='rdp' (a valid, looser bound)."
        )
    if delta <= steps * PLD_EXTENDED_FLOOR_PER_STEP:
        raise ValueError(
            f"delta={delta:g} over {steps:,} steps is below the precision of even the 80-bit PLD composition "
            f"(delta <= T x {PLD_EXTENDED_FLOOR_PER_STEP:g}); no reliable PLD epsilon can be given. Use a larger "
            "delta, fewer steps, or accountant='rdp' (a valid, looser bound)."
        )


@contextlib.contextmanager
def _extended_precision_composition() -> Iterator[None]:
    """Makes dp_accounting's PLD self-composition run its FFT in 80-bit long double (scipy.fft), then restores it.

    dp_accounting raises the FFT of the one-step PMF to the power T in float64 (`pld.common.self_convolve`); the
    replacement does the same arithmetic, with the same truncation bounds, in long double, and returns float64
    probabilities. A lock keeps concurrent threads from seeing the swap half-done.
    """
    import numpy as np
    import scipy.fft
    from dp_accounting.pld import common

    original = common.self_convolve

    def self_convolve(input_list, num_times, tail_mass_truncation=0):
        lower, upper = common.compute_self_convolve_bounds(input_list, num_times, tail_mass_truncation)
        output_len = upper - lower + 1
        fast_len = scipy.fft.next_fast_len(max(output_len, len(input_list)))
        padded = np.zeros(fast_len, dtype=np.longdouble)
        padded[: len(input_list)] = np.asarray(input_list, dtype=np.longdouble)
        composed = np.real(scipy.fft.ifft(scipy.fft.fft(padded) ** num_times))
        return lower, np.roll(composed, -lower)[:output_len].astype(np.float64)

    with _EXTENDED_LOCK:
        common.self_convolve = self_convolve
        try:
            yield
        finally:
            common.self_convolve = original


# ----------------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------------


def _gdp_epsilon(mu: float, delta: float) -> float:
    """ε of μ-Gaussian DP at δ (Dong, Roth & Su 2019): δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)."""
    from scipy import optimize, stats

    def excess(eps: float) -> float:  # e^ε Φ(-ε/μ - μ/2) <= Φ(-ε/μ + μ/2) <= 1: its log is clamped at 0
        log_second = min(eps + float(stats.norm.logcdf(-eps / mu - mu / 2)), 0.0)
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(log_second) - delta

    if excess(0.0) <= 0.0:
        return 0.0
    upper = 1.0
    while excess(upper) > 0.0:
        upper *= 2.0
    return optimize.brentq(excess, 0.0, upper, xtol=1e-10)


def _gdp_mu(epsilon: float, delta: float) -> float:
    """μ such that μ-GDP is (ε, δ)-DP with equality."""
    from scipy import optimize

    upper = 1.0
    while _gdp_epsilon(upper, delta) < epsilon:
        upper *= 2.0
    return optimize.brentq(lambda mu: _gdp_epsilon(mu, delta) - epsilon, 1e-12, upper, xtol=1e-12)


def approximate_noise_multiplier(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, *, sampling: str = "poisson"
) -> float:
    """A cheap *approximation* of the calibrated σ (a starting point for the search, never a guarantee).

    Uses the central-limit (Gaussian DP) approximation of Bu et al. (2020): ``μ = q sqrt(T (exp(1/σ²) - 1))``;
    exact for full-batch (q = 1) and shuffled (Gaussian composition) schedules, typically within a factor 1.7
    below the PLD value for small σ.

    Args:
        target_epsilon: ε.
        sampling_rate: q (for ``"shuffle"`` pass 1 and steps = epochs).
        steps: T.
        delta: δ.
        sampling: Sampling scheme (``"truncated_poisson"`` is treated as ``"poisson"``).

    Returns:
        An approximate σ (> 0).
    """
    mu = _gdp_mu(target_epsilon, delta)
    if sampling == "shuffle" or sampling_rate >= 1.0:
        return math.sqrt(steps) / mu
    return 1.0 / math.sqrt(math.log1p((mu / sampling_rate) ** 2 / steps))


def _approximate_slope(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """d log ε / d log σ of the Gaussian-DP approximation (a first secant slope; -1 if it is degenerate)."""

    def log_eps(sigma: float) -> float:
        mu = (
            math.sqrt(steps / sigma**2)
            if sampling_rate >= 1.0
            else sampling_rate * math.sqrt(steps * math.expm1(min(1.0 / sigma**2, 700.0)))
        )
        eps = _gdp_epsilon(mu, delta)
        return math.log(eps) if eps > 0.0 else math.nan

    h = 0.01
    slope = (log_eps(noise_multiplier * (1 + h)) - log_eps(noise_multiplier * (1 - h))) / (
        math.log1p(h) - math.log1p(-h)
    )
    return slope if slope < -0.1 else -1.0


def _coarse_discretizations(noise_multiplier: float, sampling_rate: float, final: float) -> list[float]:
    """Coarser PLD precisions worth running before the ``final`` one, coarsest first.

    A one-step PLD of the subsampled Gaussian spans privacy losses up to about ``log q + 10/σ + 1/(2σ²)``
    (dp_accounting keeps ``exp(-50)`` of tail mass) with one point per discretisation interval, so its cost
    grows like ``1/σ²``. Coarse levels are used only where a final evaluation is slow (>= 20,000 points), and
    each only where it still has >= 1,000 points (then it tracks the finer levels' ε to a few percent).
    """
    upper_loss = math.log(sampling_rate) + 10.0 / noise_multiplier + 0.5 / noise_multiplier**2
    if upper_loss / final < 20_000:
        return []
    return [d for d in COARSE_PLD_DISCRETIZATIONS if d > final * 1.5 and upper_loss / d >= 1_000]


def _locate(
    evaluate: Callable[[float], float],
    *,
    aim: float,
    rtol: float,
    guess: float,
    slope: float,
    max_evaluations: int = 20,
) -> tuple[float, float, int, float]:
    """Predicts σ where ε(σ) = ``aim`` with a cheap ``evaluate`` (a coarse PLD): safeguarded log-log secant.

    Stops once an evaluation is within ``rtol`` (relative, in ε) of ``aim``, and interpolates from there.

    Returns:
        ``(sigma, slope, evaluations, first_error)``: the predicted σ, the measured slope d log ε / d log σ (or
        the given one), the number of evaluations and the relative miss of the first one.
    """
    log_min, log_max, log_aim = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER), math.log(aim)
    below: float | None = None  # largest log σ seen with ε > aim
    above: float | None = None  # smallest log σ seen with ε <= aim
    previous: tuple[float, float] | None = None
    first_error = math.inf
    expand = rtol  # least move in log σ while unbracketed; doubles each time
    x = min(max(math.log(guess), log_min), log_max)
    for count in range(1, max_evaluations + 1):
        eps = evaluate(math.exp(x))
        if eps > aim:
            below = x if below is None else max(below, x)
        else:
            above = x if above is None else min(above, x)
        if not 0.0 < eps < math.inf:
            x_new = x + (math.log(2.0) if eps > aim else -math.log(2.0))
        else:
            y = math.log(eps)
            if previous is not None and abs(x - previous[0]) >= _MIN_SECANT_SPAN:
                measured = (y - previous[1]) / (x - previous[0])
                slope = _clamp_slope(measured) if measured < 0 else slope
            previous = (x, y)
            error = abs(y - log_aim)
            first_error = error if count == 1 else first_error
            x_new = x + (log_aim - y) / slope
            if error <= rtol:
                return math.exp(min(max(x_new, log_min), log_max)), slope, count, first_error
            x_new = min(max(x_new, x - math.log(4.0)), x + math.log(4.0))
        if below is not None and above is not None:
            if above - below < _MIN_SECANT_SPAN / 2:
                # ε has discretisation steps here: σ is pinned down as well as this precision allows.
                return math.exp(0.5 * (below + above)), slope, count, first_error
            if not below < x_new < above:
                x_new = 0.5 * (below + above)
        else:
            x_new = max(x_new, below + expand) if below is not None else min(x_new, above - expand)
            expand *= 2.0
        if (x_new >= log_max and x >= log_max) or (x_new <= log_min and x <= log_min):
            break  # the answer lies at a σ limit; the full-precision search reports it
        x = min(max(x_new, log_min), log_max)
    return math.exp(x), slope, max_evaluations, first_error


@dataclasses.dataclass
class _SearchResult:
    sigma: float  # accepted σ (ε <= target)
    epsilon: float
    root: float  # estimate of the σ where ε = aim (interpolated)
    slope: float | None  # d log ε / d log σ near the answer, when measured
    evaluations: int


def _search(
    evaluate: Callable[[float], float],
    *,
    target: float,
    tolerance: float,
    aim: float,
    guess: float,
    slope: float,
    max_evaluations: int = 40,
) -> _SearchResult:
    """Finds σ with ε(σ) <= target and (ε(σ) >= target·(1 - tol) or ε(σ·(1 - tol)) > target), ε decreasing in σ.

    Safeguarded secant on (log σ, log ε): each step evaluates the predicted σ where ε = ``aim`` (inside the
    window), starting at ``guess``. Where the window is missed from close by (ε steep in σ, or with
    discretisation steps), it evaluates σ·(1 - tol) below the best σ instead, which settles the second condition
    exactly (without assuming ε monotone: PLD discretisation makes it slightly irregular). Bisection takes over
    whenever interpolation leaves the bracket or stalls.

    Raises:
        UnreachableEpsilonError: If ε > target still at :data:`MAX_NOISE_MULTIPLIER`.
    """
    log_min, log_max = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)
    log_aim, log_shrink = math.log(aim), math.log1p(-tolerance)
    lo: tuple[float, float] | None = None  # (log σ, ε) of the largest σ seen with ε > target
    hi: tuple[float, float] | None = None  # (log σ, ε) of the smallest σ seen with ε <= target
    last: list[tuple[float, float]] = []  # (log σ, log ε) of the two latest finite, positive evaluations
    widths: list[float] = []
    above_target: set[float] = set()  # log σ of the evaluations with ε > target
    steps_seen = False  # evidence that ε has discretisation steps here, so the ε window may not exist
    expand = -log_shrink / 8  # least move while unbracketed; doubles each time (guards against bad slopes)
    x = min(max(math.log(guess), log_min), log_max)
    for count in range(1, max_evaluations + 1):
        # aimed from both sides of a bracket narrower than 2·tol: a smooth ε would land in the window
        narrow = lo is not None and hi is not None and hi[0] - lo[0] <= -2 * log_shrink
        eps = evaluate(math.exp(x))
        if eps > target:
            lo = (x, eps) if lo is None or x > lo[0] else lo
            above_target.add(x)
        else:
            hi = (x, eps) if hi is None or x < hi[0] else hi
        if 0.0 < eps < math.inf:
            last = [*last[-1:], (x, math.log(eps))]
        x_aim, measured = _predict_root(lo, hi, last, log_aim, slope)
        if hi is not None and (
            hi[1] >= target * (1.0 - tolerance)
            or (steps_seen and hi[0] + log_shrink in above_target)  # ε(σ·(1 - tol)) > target, evaluated exactly
            or hi[0] <= log_min
        ):
            return _SearchResult(math.exp(hi[0]), hi[1], math.exp(x_aim), measured, count)
        if lo is not None and lo[0] >= log_max:
            raise UnreachableEpsilonError(
                f"target epsilon {target:.6g} is unreachable: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} gives "
                f"epsilon={lo[1]:.6g}; use fewer steps, a smaller sampling rate, or a larger epsilon.",
                target_epsilon=target,
                best_epsilon=lo[1],
            )
        # A miss from a narrow bracket, or ε larger at a larger σ, means ε has steps here: the window may not
        # exist, so settle for σ within tol of the smallest one (ε(σ·(1 - tol)) > target, checked exactly).
        inverted = lo is not None and hi is not None and lo[0] >= hi[0]
        steps_seen = steps_seen or narrow or inverted
        if steps_seen and hi is not None and (inverted or x_aim >= hi[0] + log_shrink):
            x = hi[0] + log_shrink  # σ·(1 - tol) below the best σ: its ε settles the second condition
            continue
        if eps == math.inf:
            x_new = x + math.log(2.0)
        elif eps <= 0.0:
            x_new = x - math.log(2.0)
        else:
            x_new = min(max(x_aim, x - math.log(4.0)), x + math.log(4.0))
        if lo is not None and hi is not None and lo[0] < hi[0]:
            width = hi[0] - lo[0]
            widths.append(width)
            stalled = len(widths) >= 3 and width > 0.5 * widths[-3]
            if stalled or not lo[0] < x_new < hi[0]:
                x_new = 0.5 * (lo[0] + hi[0])
                widths.clear()
        elif lo is not None and hi is None:
            x_new = max(x_new, lo[0] + expand)
            expand *= 2.0
        elif hi is not None and lo is None:
            x_new = min(x_new, hi[0] - expand)
            expand *= 2.0
        x = min(max(x_new, log_min), log_max)
    if hi is None:  # pragma: no cover - needs > 40 doublings, impossible between the σ limits
        raise RuntimeError("noise calibration did not converge")
    x_aim, measured = _predict_root(lo, hi, last, log_aim, slope)
    return _SearchResult(math.exp(hi[0]), hi[1], math.exp(x_aim), measured, max_evaluations)


def _clamp_slope(slope: float) -> float:
    """Keeps a measured d log ε / d log σ within [-25, -0.25]: steeper or flatter secants are discretisation noise."""
    return min(max(slope, -25.0), -0.25)


def _predict_root(
    lo: tuple[float, float] | None,
    hi: tuple[float, float] | None,
    last: list[tuple[float, float]],
    log_value: float,
    default_slope: float,
) -> tuple[float, float | None]:
    """Predicts log σ where log ε = ``log_value``, from the bracket ends (else the last two points).

    Returns:
        ``(log σ̂, slope)`` where slope is the measured d log ε / d log σ, or None if none was measured.
    """
    ends = [(x, math.log(eps)) for x, eps in (p for p in (lo, hi) if p is not None) if 0.0 < eps < math.inf]
    pair = ends if len(ends) == 2 else last
    measured = None
    if len(pair) == 2 and abs(pair[1][0] - pair[0][0]) >= _MIN_SECANT_SPAN:
        candidate = (pair[1][1] - pair[0][1]) / (pair[1][0] - pair[0][0])
        measured = _clamp_slope(candidate) if candidate < 0 else None
    slope = measured if measured is not None else _clamp_slope(default_slope)
    if not last:
        return (lo or hi)[0] + (math.log(2.0) if hi is None else -math.log(2.0)), measured
    # Interpolate from the point nearest the target.
    x_ref, y_ref = min(ends or last, key=lambda p: abs(p[1] - log_value))
    return x_ref + (log_value - y_ref) / slope, measured


def calibrate_noise(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
    logical_batch_size: int | None = None,
    tolerance: float = 0.01,
    initial_guess: float | None = None,
    initial_slope: float | None = None,
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
) -> NoiseCalibration:
    """Finds the smallest σ whose ε (at δ, after ``steps`` steps) is at most ``target_epsilon``.

    The returned σ satisfies ``ε(σ) <= target`` with ε computed by `dp_accounting` (PLD at
    ``pld_discretization``, by default its default precision), and either ``ε(σ) >= target * (1 - tolerance)`` or
    ``ε(σ * (1 - tolerance)) > target`` (then σ is within ``tolerance`` of the smallest σ; this case is used where
    ε(σ) is steep or has discretisation steps).

    It is fast because the final-precision PLD (up to seconds per evaluation for small σ) is evaluated only a
    few times: a Gaussian-DP approximation (or ``initial_guess``) starts the search; where a final PLD is
    expensive, coarser PLDs (used only to predict, never to report) locate σ first; a safeguarded secant on
    (log σ, log ε) at the final precision then finishes, typically after one or two evaluations.

    Args:
        target_epsilon: ε to reach.
        sampling_rate: q.
        steps: Number of steps T (>= 1).
        delta: δ.
        accountant: ``"pld"`` or ``"rdp"``.
        sampling: One of :data:`SAMPLING_SCHEMES`.
        dataset_size: N.
        max_batch_size: Physical cap for ``"truncated_poisson"``.
        logical_batch_size: B.
        tolerance: Relative tolerance in ε (default 1%).
        initial_guess: Optional starting σ (e.g. from a neighbouring configuration); only affects speed.
        initial_slope: Optional d log ε / d log σ near the answer (e.g. ``slope`` of a neighbour's result);
            only affects speed.
        pld_discretization: PLD value discretisation interval of the reported ε (PLD accountant only). Every
            interval gives an upper bound on ε (dp_accounting's pessimistic discretisation); the default one is
            the precision the trainer reports; coarser ones are faster and slightly looser (the planner uses
            one and checks the gap).

    Returns:
        A :class:`NoiseCalibration`.

    Raises:
        ValueError: On invalid arguments.
        UnreachableEpsilonError: If σ ≤ :data:`MAX_NOISE_MULTIPLIER` cannot reach the target.
    """
    target_epsilon = _check_epsilon(target_epsilon)
    steps = _as_int(steps, "steps", minimum=1)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    tolerance = _as_float(tolerance, "tolerance")
    if not 0.0 < tolerance < 0.5:
        raise ValueError(f"tolerance must be in (0, 0.5), got {tolerance}.")
    pld_discretization = _check_pld_discretization(pld_discretization)
    spec = _check_sampling(sampling, sampling_rate, dataset_size, max_batch_size, logical_batch_size)
    if spec.scheme == "truncated_poisson" and accountant == "rdp":
        _epsilon(1.0, 1, delta, spec, accountant, DEFAULT_PLD_DISCRETIZATION)  # raises the explanatory error

    if initial_guess is not None:
        guess = _as_float(initial_guess, "initial_guess")
        if not 0.0 < guess < math.inf:
            raise ValueError(f"initial_guess must be finite and > 0, got {guess}.")
    elif spec.scheme == "shuffle":
        guess = approximate_noise_multiplier(target_epsilon, 1.0, spec.epochs(steps), delta, sampling="shuffle")
    else:
        # The Gaussian-DP approximation is low by up to ~40% for small σ; starting above it is also cheaper
        # (a PLD's size shrinks like 1/σ²).
        guess = 1.3 * approximate_noise_multiplier(target_epsilon, spec.sampling_rate, steps, delta)
    if initial_slope is not None:
        slope = _as_float(initial_slope, "initial_slope")
        if not -math.inf < slope < 0.0:
            raise ValueError(f"initial_slope must be negative (ε decreases with σ), got {slope}.")
    elif spec.scheme == "shuffle":
        slope = _approximate_slope(guess, 1.0, spec.epochs(steps), delta)
    else:
        slope = _approximate_slope(guess, spec.sampling_rate, steps, delta)

    levels: list[float] = []
    if accountant == "pld":
        rate = 1.0 if spec.scheme == "shuffle" else spec.sampling_rate
        levels = _coarse_discretizations(max(guess, MIN_NOISE_MULTIPLIER), rate, pld_discretization)
    aim = target_epsilon * (1.0 - tolerance / 2)  # the middle of the accepted ε window
    coarse_evaluations = 0
    for level, discretization in enumerate(levels):
        # Predict σ(ε = aim) at this precision to ±tol/8 in ε; the prediction seeds the next, finer level.
        guess, slope, count, first_error = _locate(
            lambda sigma, d=discretization: _epsilon(sigma, steps, delta, spec, accountant, d),
            aim=aim,
            rtol=tolerance / 8,
            guess=guess,
            slope=slope,
        )
        coarse_evaluations += count
        if level > 0 and first_error <= tolerance / 8:
            break  # this level agreed with the coarser one at once: finer ones would change little
    fine = _search(
        lambda sigma: _epsilon(sigma, steps, delta, spec, accountant, pld_discretization),
        target=target_epsilon,
        tolerance=tolerance,
        aim=aim,
        guess=guess,
        slope=slope,
    )
    return NoiseCalibration(
        fine.sigma,
        fine.epsilon,
        fine.evaluations,
        coarse_evaluations,
        fine.slope if fine.slope is not None else slope,
        pld_discretization,
    )


def calibrate_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
    logical_batch_size: int | None = None,
    tolerance: float = 0.01,
) -> float:
    """The smallest σ with ε(σ) <= ``target_epsilon`` (within ``tolerance``); see :func:`calibrate_noise`."""
    return calibrate_noise(
        target_epsilon,
        sampling_rate,
        steps,
        delta,
        accountant=accountant,
        sampling=sampling,
        dataset_size=dataset_size,
        max_batch_size=max_batch_size,
        logical_batch_size=logical_batch_size,
        tolerance=tolerance,
    ).noise_multiplier


# ----------------------------------------------------------------------------------------------------------------
# Stateful accountant
# ----------------------------------------------------------------------------------------------------------------


class PrivacyAccountant:
    """Tracks the privacy spent by one training run (one instance per run, stepped once per logical step).

    Args:
        noise_multiplier: σ used at every step (0 = non-private control, ε = inf).
        sampling_rate: q.
        accountant: ``"pld"`` or ``"rdp"``.
        sampling: One of :data:`SAMPLING_SCHEMES`.
        dataset_size: N.
        max_batch_size: Physical cap for ``"truncated_poisson"``.
        logical_batch_size: B.

    Example:
        >>> acc = PrivacyAccountant(1.0, 0.01)
        >>> acc.step(100)
        >>> round(acc.get_epsilon(1e-5), 2)
        0.72
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        *,
        accountant: str = "pld",
        sampling: str = "poisson",
        dataset_size: int | None = None,
        max_batch_size: int | None = None,
        logical_batch_size: int | None = None,
    ):
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier)
        self.accountant = _check_accountant(accountant)
        self._spec = _check_sampling(sampling, sampling_rate, dataset_size, max_batch_size, logical_batch_size)
        if self.accountant == "rdp" and self._spec.scheme == "truncated_poisson":
            _epsilon(1.0, 1, 0.5, self._spec, "rdp", DEFAULT_PLD_DISCRETIZATION)  # raises the explanatory error
        self.steps = 0
        self._cache: dict[tuple[int, float], float] = {}

    @property
    def sampling(self) -> str:
        return self._spec.scheme

    @property
    def sampling_rate(self) -> float:
        return self._spec.sampling_rate

    def step(self, num_steps: int = 1) -> None:
        """Records ``num_steps`` more logical steps."""
        self.steps += _as_int(num_steps, "num_steps", minimum=0)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0.0 before the first step; cached per (steps, δ))."""
        delta = _check_delta(delta)
        key = (self.steps, delta)
        if key not in self._cache:
            self._cache = {
                key: _epsilon(
                    self.noise_multiplier, self.steps, delta, self._spec, self.accountant, DEFAULT_PLD_DISCRETIZATION
                )
            }
        return self._cache[key]

    def _parameters(self) -> dict:
        return {
            "accountant": self.accountant,
            "sampling": self._spec.scheme,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self._spec.sampling_rate,
            "dataset_size": self._spec.dataset_size,
            "max_batch_size": self._spec.max_batch_size,
            "logical_batch_size": self._spec.logical_batch_size,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable state: parameters, steps taken, and the `dp_accounting` version."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            **self._parameters(),
            "steps": self.steps,
            "dp_accounting_version": dp_accounting_version(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PrivacyAccountant:
        """Rebuilds an accountant from [`state_dict`]'s output: its parameters, then its steps.

        Raises:
            ValueError: If the state is malformed.
        """
        if not isinstance(state, dict):
            raise ValueError(f"accountant state must be a dict, got {type(state).__name__}.")
        try:
            accountant = cls(
                float(state["noise_multiplier"]),
                float(state["sampling_rate"]),
                accountant=state["accountant"],
                sampling=state["sampling"],
                dataset_size=state.get("dataset_size"),
                max_batch_size=state.get("max_batch_size"),
                logical_batch_size=state.get("logical_batch_size"),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed accountant state: {err!r}.") from None
        accountant.load_state_dict(state)
        return accountant

    def load_state_dict(self, state: dict) -> None:
        """Restores the steps of a saved run; refuses a state whose privacy parameters differ from this one's.

        Raises:
            ValueError: If the state is malformed or any parameter (σ, q, sampling, accountant, sizes) differs.
        """
        if not isinstance(state, dict):
            raise ValueError(f"accountant state must be a dict, got {type(state).__name__}.")
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(
                f"unsupported accountant state format_version {state.get('format_version')!r} "
                f"(expected {STATE_FORMAT_VERSION})."
            )
        missing = [key for key in (*self._parameters(), "steps") if key not in state]
        if missing:
            raise ValueError(f"accountant state is missing {missing}.")
        mismatched = [
            f"{key}: saved {state[key]!r} != current {value!r}"
            for key, value in self._parameters().items()
            if state[key] != value
        ]
        if mismatched:
            raise ValueError(
                "cannot resume privacy accounting with different parameters (the guarantee would not hold): "
                + "; ".join(mismatched)
            )
        steps = _as_int(state["steps"], "steps", minimum=0)
        saved_version = state.get("dp_accounting_version")
        if saved_version != dp_accounting_version():
            warnings.warn(
                f"accountant state was saved with dp_accounting {saved_version}, now {dp_accounting_version()}; "
                "epsilon is recomputed with the installed version.",
                stacklevel=2,
            )
        self.steps = steps
        self._cache = {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._parameters().items() if v is not None)
        return f"{type(self).__name__}({params}, steps={self.steps})"
