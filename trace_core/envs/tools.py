"""Running a tool call (retrieval, code execution, HTTP, ...) under a wall-clock timeout.

Python cannot kill a thread, so a call that times out keeps running in its daemon worker thread
while the env moves on; its result is discarded. So that such calls cannot pile up, the workers
are bounded: at most `MAX_TOOL_THREADS` tool calls run at once in a process. A timed-out call
holds its slot until it returns; when every slot is held, a new call waits for one within its
own timeout and otherwise fails with ToolTimeout, so a tool that hangs (or spins) forever costs
at most that many threads. Tools that can hang should still set their own internal timeouts
(e.g. an HTTP client timeout) so their slots come back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

MAX_TOOL_THREADS = 8

_slots = threading.BoundedSemaphore(MAX_TOOL_THREADS)


class ToolTimeout(TimeoutError):
    """A tool call did not return within its timeout (or found no free worker within it)."""


class ToolError(RuntimeError):
    """A tool call raised SystemExit: reported as an error of the call instead of ending the process."""


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout_s: float | None, **kwargs: Any) -> tuple[Any, float]:
    """Run `fn(*args, **kwargs)`; returns (result, seconds taken).

    timeout_s None or inf (anything from threading.TIMEOUT_MAX, ~292 years, up) runs the call in
    the current thread with no limit. Otherwise the call runs in a worker thread (bounded, see the
    module docstring) and ToolTimeout is raised after `timeout_s` seconds. An exception raised by
    `fn` is re-raised here unchanged, except SystemExit, which becomes ToolError (a tool must not
    end the process; KeyboardInterrupt still propagates).
    """
    if timeout_s is not None and not timeout_s > 0:  # also NaN
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    name = getattr(fn, "__name__", repr(fn))
    start = time.perf_counter()
    if timeout_s is None or timeout_s >= threading.TIMEOUT_MAX:  # a wait this long overflows (inf did)
        return _run(fn, args, kwargs, name), time.perf_counter() - start
    if not _slots.acquire(timeout=timeout_s):
        raise ToolTimeout(
            f"tool call {name!r}: no free tool worker within timeout_s={timeout_s} "
            f"(all {MAX_TOOL_THREADS} are still running calls that timed out)"
        )
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["result"] = _run(fn, args, kwargs, name)
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()
            _slots.release()

    try:
        threading.Thread(target=target, name=f"tool-{name}", daemon=True).start()
    except BaseException:
        _slots.release()
        raise
    remaining = timeout_s - (time.perf_counter() - start)
    if not done.wait(max(remaining, 0.0)):
        raise ToolTimeout(f"tool call {name!r} exceeded timeout_s={timeout_s}")
    if "error" in box:
        raise box["error"]
    return box["result"], time.perf_counter() - start


def _run(fn: Callable[..., Any], args: tuple, kwargs: dict, name: str) -> Any:
    try:
        return fn(*args, **kwargs)
    except SystemExit as exc:
        raise ToolError(f"tool call {name!r} raised SystemExit({exc.code!r})") from exc
