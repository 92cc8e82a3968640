"""Rates with their sampling uncertainty: the Wilson score interval of a binomial proportion."""

from __future__ import annotations

import math

from sinkscope.errors import InputError

#: z of a two-sided 95% interval
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of ``successes`` out of ``n`` (95% by default; ``(nan, nan)`` for
    ``n = 0``). Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes.

    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]
    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]

    Raises:
        InputError: counts that are not integers with ``0 <= successes <= n``.
    """
    if isinstance(successes, bool) or isinstance(n, bool) or not isinstance(successes, int) or not isinstance(n, int):
        raise InputError(f"counts must be integers, got {successes!r} of {n!r}")
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise InputError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
