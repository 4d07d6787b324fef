"""One way to run a long native call: in a worker thread, so Ctrl+C reaches Python while it works."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_worker(work: Callable[[], T], *, name: str, cancel: Callable[[], None] | None = None) -> tuple[T, bool]:
    """Run ``work()`` in a daemon thread and wait for it; returns (its result, whether Ctrl+C came).

    Python only sees Ctrl+C (and SIGTERM, see llqx.cli) in the main thread, so native work runs in a
    worker. On Ctrl+C with ``cancel`` the worker is asked to stop and awaited (it returns what it has);
    without one (llama.cpp's writer has no cancel) KeyboardInterrupt is raised at once and the worker
    runs on in the background. An exception raised by ``work`` is re-raised here.
    """
    outcome: dict[str, object] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    interrupted = False
    # wait on an event, not on join(): an interrupted join() can leave the thread marked as stopped
    while not finished.is_set():
        try:
            finished.wait(0.1)
        except KeyboardInterrupt:
            if cancel is None:
                raise
            interrupted = True
            cancel()
    worker.join()
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return outcome["value"], interrupted  # type: ignore[return-value]
