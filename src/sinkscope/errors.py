"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class SinkscopeError(Exception):
    """Base class for errors caused by bad input (model spec, text, counts, paths).

    Library code names the parameter at fault (``max_tokens``) and passes it as ``param``; the CLI shows the
    flag the user typed instead (``--max-tokens``, see `sinkscope.cli.__main__.user_message`).

    >>> str(InputError("max_tokens must be a positive integer, got 0", param="max_tokens"))
    'max_tokens must be a positive integer, got 0'
    """

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(SinkscopeError):
    """The model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(SinkscopeError):
    """The model's architecture has no adapter."""


class InputError(SinkscopeError):
    """Bad input text or token counts."""
