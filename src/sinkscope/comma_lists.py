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


def parse_floats(text: str, *, flag: str, unique_sorted: bool = False) -> tuple[float, ...]:
    """Numbers from ``"0.125,0.25"``, in the order given (``unique_sorted``: repeats dropped, ascending).

    Raises:
        InputError: ``--FLAG must be a comma list of (finite) numbers, got '...'`` for a non-number,
            ``--FLAG: give at least one number`` for an empty list.
    """
    values = _numbers(text, flag, "numbers")
    return tuple(sorted(set(values))) if unique_sorted else tuple(values)


def parse_ints(text: str, *, flag: str, unique_sorted: bool = False) -> tuple[int, ...]:
    """Whole numbers from ``"512,1024"`` (``2e3`` is 2000; ``1.5`` is refused), as :func:`parse_floats` orders them.

    Raises:
        InputError: ``--FLAG must be a comma list of (finite) integers, got '...'`` for a non-number or a fraction,
            ``--FLAG: give at least one number`` for an empty list.
    """
    values = _numbers(text, flag, "integers")
    if any(v != int(v) for v in values):
        raise InputError(f"--{flag} must be a comma list of integers, got {text!r}", param=flag.replace("-", "_"))
    ints = [int(v) for v in values]
    return tuple(sorted(set(ints))) if unique_sorted else tuple(ints)


def _numbers(text: str, flag: str, kind: str) -> list[float]:
    """The finite numbers of a non-empty comma list (``kind`` names them in errors: numbers or integers)."""
    param = flag.replace("-", "_")
    try:
        values = [float(x) for x in split_items(text)]
    except ValueError:
        raise InputError(f"--{flag} must be a comma list of {kind}, got {text!r}", param=param) from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"--{flag} must be a comma list of finite {kind}, got {text!r}", param=param)
    if not values:
        raise InputError(f"--{flag}: give at least one number", param=param)
    return values
