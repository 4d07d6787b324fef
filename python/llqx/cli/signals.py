"""SIGTERM handled as Ctrl+C: whatever cleans up after an interrupt (partial outputs, state saves)
runs for a `kill` too."""

from __future__ import annotations

import signal
import threading
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """Raise KeyboardInterrupt in the main thread on SIGTERM (the CLIs' entry points call this)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
