"""A status line for a call that takes a while: the client's own words, and how long it has run.

The client reports through a callback from inside a blocking call; `run_with_status` runs that
call in a worker thread and turns its reports into a stream of lines that a Gradio generator
can yield, with the elapsed time ticking between reports, so the designer can tell that the
endpoint is still working (a cold model takes minutes to load) and not stuck.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from studio.client import StatusCallback

Result = TypeVar("Result")

TICK_S = 1.0
# After this long without an answer the line says why it can take so long.
SLOW_AFTER_S = 8.0
SLOW_HINT = "a model's first call loads it, which takes minutes on a cold endpoint; large images and many steps take longer"
_DONE = object()


def run_with_status(
    call: Callable[[StatusCallback], Result],
    *,
    present: Callable[[str], Any] = str,
    tick_s: float = TICK_S,
    slow_after_s: float = SLOW_AFTER_S,
    waiting: Callable[[], str | None] | None = None,
) -> Generator[Any, None, Result]:
    """Yield `present(line)` for each status line while `call(on_status)` runs; return its result.

    Use as `result = yield from run_with_status(...)`; `call`'s error is raised there. If the
    consumer stops early (Gradio's Cancel), the worker thread is left to finish on its own and
    its result is dropped: a request already sent to the endpoint cannot be taken back.
    `waiting()`, when given, is asked at each line: a text while the call waits its turn.
    """
    reports: queue.Queue = queue.Queue()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["result"] = call(reports.put)
        except BaseException as error:  # handed to the consumer, which raises it
            outcome["error"] = error
        finally:
            reports.put(_DONE)

    started = time.monotonic()
    threading.Thread(target=work, name="studio-call", daemon=True).start()
    latest = "Starting…"
    while True:
        try:
            report = reports.get(timeout=tick_s)
        except queue.Empty:
            report = None
        if report is _DONE:
            break
        if report is not None:
            latest = str(report)
        # While the call waits its turn (see studio.scheduler), that is what the designer sees.
        line = waiting() if waiting is not None else None
        yield present(status_line(line or latest, time.monotonic() - started, slow_after_s))
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def status_line(message: str, elapsed_s: float, slow_after_s: float = SLOW_AFTER_S) -> str:
    line = f"**Working:** {message} ({elapsed_s:.0f} s)"
    if elapsed_s >= slow_after_s:
        line += f": {SLOW_HINT}"
    return line
