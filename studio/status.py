"""A status line for a job that takes a while: the client's own words, and how long it has run.

`with_status` turns a running job's events (studio.runner.job_events) into a stream of lines a
Gradio generator can yield, on the handler's own thread: each status line as it comes, and between
them the elapsed time ticking once a second, so the designer can tell that the endpoint is still
working (a cold model takes minutes to load) and not stuck.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from studio.results import GenerationResult
from studio.runner import ImageDone, Status

Result = TypeVar("Result")

TICK_S = 1.0  # how often the elapsed time moves on (runner.job_events' tick_s)
# After this long without an answer the line says why it can take so long.
SLOW_AFTER_S = 8.0
SLOW_HINT = "a model's first call loads it, which takes minutes on a cold endpoint; large images and many steps take longer"


def with_status(
    events: Generator[Any, None, Result],
    *,
    present: Callable[[str], Any] = str,
    on_image: Callable[[int, GenerationResult], None] | None = None,
    waiting: Callable[[], str | None] | None = None,
    first_line: str = "Starting…",
    slow_after_s: float = SLOW_AFTER_S,
) -> Generator[Any, None, Result]:
    """Yield `present(line)` at each event of a job (a status line, an image done, a tick); return
    its result. Use as `result = yield from with_status(...)`; the job's error is raised there.

    `on_image(index, result)` is told of each image as it is done, before the line that follows.
    `waiting()`, when given, is asked at each line: a text while the job waits its turn. If the
    consumer stops early (Gradio's Cancel), the job is closed: its calls not yet sent are not sent,
    and a call already on the endpoint finishes there, its result dropped.
    """
    started = time.monotonic()
    latest = first_line
    try:
        while True:
            try:
                event = next(events)
            except StopIteration as done:
                return done.value
            if isinstance(event, Status):
                latest = event.line
            elif isinstance(event, ImageDone) and on_image is not None:
                on_image(event.index, event.result)
            # While the job waits its turn (see studio.scheduler), that is what the designer sees.
            line = waiting() if waiting is not None else None
            yield present(status_line(line or latest, time.monotonic() - started, slow_after_s))
    finally:
        events.close()


def status_line(message: str, elapsed_s: float, slow_after_s: float = SLOW_AFTER_S) -> str:
    line = f"**Working:** {message} ({elapsed_s:.0f} s)"
    if elapsed_s >= slow_after_s:
        line += f": {SLOW_HINT}"
    return line
