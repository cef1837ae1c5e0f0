"""Printing privacy figures on the safe side: rounded up, never to nearest."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Decimal

__all__ = ["round_up"]


def round_up(value: float, digits: int = 4) -> str:
    """`value` to `digits` significant digits, rounded *up* (`f"{value:.4g}"` rounds to nearest).

    A printed ε or δ rounded down states a guarantee the run does not have (1.23441 -> "1.234"), and a σ printed
    rounded down, if copied, gives more than the target ε. The value is taken at its shortest round-trip decimal
    (`repr`), so a δ of 1e-5 prints as "1e-05", not one unit above.

    Args:
        value: The number; zero, negative or non-finite values are formatted as `f"{value:.{digits}g}"`.
        digits: Significant digits.

    Returns:
        The formatted number, whose value is >= `value`.
    """
    if not (math.isfinite(value) and value > 0):
        return f"{value:.{digits}g}"
    exact = Decimal(repr(float(value)))
    quantum = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    return f"{float(exact.quantize(quantum, rounding=ROUND_CEILING)):.{digits}g}"
