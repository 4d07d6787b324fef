"""The one exception type llqx raises for bad input, with a message meant for a single line, and the one
mapping of the core's exceptions onto it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _core
from . import log as _log


class LlqxError(Exception):
    """A user-facing error: bad input, a refused operation, a failed llama.cpp call."""


def core_call(fn: Callable[..., Any], *args: object, **kwargs: object) -> Any:
    """Call into llqx._core; its errors (InputError, LoadError, CoreError) become one-line LlqxErrors, a
    failed load naming the cause llama.cpp logged for this call."""
    _log.recent_errors.clear()
    try:
        return fn(*args, **kwargs)
    except _core.Error as exc:
        msg = str(exc)
        if isinstance(exc, _core.LoadError):
            cause = _log.last_error("")
            msg = f"{msg}: {cause}" if cause else msg
        raise LlqxError(msg) from None
