"""llama.cpp's and ggml's log, routed into Python's logging (quiet unless a handler shows it)."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from . import _core

logger = logging.getLogger("llqx.llama")
# a library stays silent unless the application configures logging (no lastResort to stderr);
# the CLIs attach their own handlers
logging.getLogger("llqx").addHandler(logging.NullHandler())

_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_lock = threading.Lock()
_pending: list[str] = []
_last_level = logging.INFO
recent_errors: deque[str] = deque(maxlen=8)
_local = threading.local()


@contextmanager
def muted() -> Iterator[None]:
    """Drop llama.cpp's log lines emitted by this thread (for calls that report errors themselves)."""
    depth = getattr(_local, "muted", 0)
    _local.muted = depth + 1
    try:
        yield
    finally:
        _local.muted = depth


def _sink(level: int, text: str) -> None:
    """Join llama.cpp's partial lines (level 5 = continuation) and log whole lines."""
    global _last_level
    if getattr(_local, "muted", 0):
        return
    with _lock:
        if level != 5:
            _last_level = _LEVELS.get(level, logging.INFO)
        _pending.append(text)
        joined = "".join(_pending)
        if not joined.endswith("\n"):
            return
        _pending.clear()
        lvl = _last_level
    for line in joined.rstrip("\n").split("\n"):
        if lvl >= logging.ERROR or "error" in line.lower() or "failed" in line.lower():
            recent_errors.append(line.strip())
        logger.log(lvl, "%s", line)


def install() -> None:
    """Route llama.cpp's log to the 'llqx.llama' logger (done on import of llqx)."""
    _core.log_set(_sink)


def last_error(default: str) -> str:
    """The most telling recent llama.cpp error line, to name the cause of a failed call."""
    for line in reversed(recent_errors):
        text = line.split(": ", 1)[-1].strip() if ": " in line else line
        if text:
            return text
    return default
