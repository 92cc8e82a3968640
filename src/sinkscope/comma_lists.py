"""Comma lists as users type them (``--lengths 64,512``, ``--methods dense,policy``): the one parser of the CLI and
of the library entries that accept the same strings.

Items are stripped and empty items dropped (``"a, b,"`` is ``("a", "b")``); an empty list, a value that is not a
number, or a name outside the allowed set is a one-line :class:`~sinkscope.errors.InputError` naming the flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from sinkscope.errors import InputError


def split_items(text: str) -> tuple[str, ...]:
    """The stripped, non-empty items of ``text`` in their order (no check)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_names(text: str, *, flag: str, known: Iterable[str] | None = None,
                empty: str = "give at least one value") -> tuple[str, ...]:
    """Names from ``"a,b"``.

    Args:
        text: the comma list.
        flag: the option's name without dashes (``repeat-words``); shown in errors and passed as ``param``.
        known: the allowed names; None allows any.
        empty: what the error for an empty list asks for.

    Raises:
        InputError: ``--FLAG: <empty>`` for an empty list; ``unknown --FLAG x,y; choose from ...`` for names
            outside ``known``.
    """
    names = split_items(text)
    if not names:
        raise InputError(f"--{flag}: {empty}", param=flag.replace("-", "_"))
    if known is not None:
        allowed = list(known)
        bad = [n for n in names if n not in allowed]
        if bad:
            raise InputError(f"unknown --{flag} {','.join(bad)}; choose from {','.join(allowed)}",
                             param=flag.replace("-", "_"))
    return names


def parse_numbers(text: str, *, flag: str, integer: bool = False, unique_sorted: bool = False
                  ) -> tuple[float, ...] | tuple[int, ...]:
    """Numbers from ``"0.125,0.25"`` (floats) or ``"512,1024"`` (``integer=True``: whole numbers only).

    Args:
        text: the comma list.
        flag: the option's name without dashes; shown in errors.
        integer: refuse values that are not whole numbers and return ints.
        unique_sorted: drop repeats and sort ascending (lengths); otherwise keep the order given.

    Raises:
        InputError: ``--FLAG must be a comma list of numbers|integers, got '...'`` for a non-number (or a fraction
            where integers are asked for), ``--FLAG: give at least one number`` for an empty list.
    """
    kind = "integers" if integer else "numbers"
    param = flag.replace("-", "_")
    items = split_items(text)
    try:
        values = [float(x) for x in items]
    except ValueError:
        raise InputError(f"--{flag} must be a comma list of {kind}, got {text!r}", param=param) from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"--{flag} must be a comma list of finite {kind}, got {text!r}", param=param)
    if not values:
        raise InputError(f"--{flag}: give at least one number", param=param)
    if integer:
        if any(v != int(v) for v in values):
            raise InputError(f"--{flag} must be a comma list of {kind}, got {text!r}", param=param)
        ints = [int(v) for v in values]
        return tuple(sorted(set(ints))) if unique_sorted else tuple(ints)
    return tuple(sorted(set(values))) if unique_sorted else tuple(values)
