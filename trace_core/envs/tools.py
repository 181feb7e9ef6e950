"""Running a tool call (retrieval, code execution, HTTP, ...) under a wall-clock timeout.

Python cannot kill a thread, so a call that times out keeps running in a daemon worker thread
while the env moves on; its result is discarded. Tools that can hang forever should also set
their own internal timeouts (e.g. an HTTP client timeout) so those threads finish eventually.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class ToolTimeout(TimeoutError):
    """A tool call did not return within its timeout."""


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float | None, **kwargs: Any) -> tuple[Any, float]:
    """Run `fn(*args, **kwargs)`; returns (result, seconds taken).

    timeout_s None runs the call in the current thread with no limit. Otherwise the call runs in
    a daemon thread and ToolTimeout is raised after `timeout_s` seconds. An exception raised by
    `fn` is re-raised here unchanged.
    """
    start = time.perf_counter()
    if timeout_s is None:
        return fn(*args, **kwargs), time.perf_counter() - start
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"tool-{getattr(fn, '__name__', 'call')}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    elapsed = time.perf_counter() - start
    if worker.is_alive():
        raise ToolTimeout(f"tool call {getattr(fn, '__name__', fn)!r} exceeded timeout_s={timeout_s}")
    if "error" in box:
        raise box["error"]
    return box["result"], elapsed
