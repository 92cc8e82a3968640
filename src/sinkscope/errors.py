"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class SinkscopeError(Exception):
    """Base class for errors caused by bad input (model spec, text, counts, paths)."""


class ModelLoadError(SinkscopeError):
    """The model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(SinkscopeError):
    """The model's architecture has no adapter."""


class InputError(SinkscopeError):
    """Bad input text or token counts."""
