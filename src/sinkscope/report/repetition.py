"""The repetition section of `sinkscope report`: divergence rate vs run length, the circuit, the patch effect.

It calls the repeated-token library (issue 4: `sinkscope.tasks.repeated_tokens`, `sinkscope.interventions`);
when that is not available the section fails with a clear message and the rest of the report still renders.
"""

from __future__ import annotations

from typing import Any

from sinkscope.errors import SinkscopeError


class RepetitionUnavailable(SinkscopeError):
    """The repeated-token analysis is not available in this installation."""


def repetition_section(ctx: Any, sec: Any, progress: Any) -> None:
    raise RepetitionUnavailable("the repeated-token divergence scan (sinkscope repeat) is not available yet")
