"""The engine's own error type for bad input (so callers can tell it from a bug)."""

from __future__ import annotations


class InputError(ValueError):
    """An input the engine refuses: an image too small or too large, NaN/Inf pixels, an empty
    prompt, an out-of-range sampling parameter. The message says which and why.

    A ValueError subclass so existing ``except ValueError`` callers keep working; callers that
    must not mistake a bug (a numpy broadcast error is a ValueError too) for bad input catch
    this type instead."""
