"""Sending a planned job (studio.planning): every call at once, the answers put together as they come.

    result = run_job(client, plan, *, submit=None, on_status=None, on_result=None, cancelled=None)
        Blocks until every call that was sent has answered; returns a JobResult (never raises for
        a failed call: the failures are in `result.failures`; `result.raise_for_errors()` turns
        them into StudioError or PartialJobError).
        client: anything with StudioClient.invoke's signature (it sends one call).
        submit(fn) -> concurrent.futures.Future: how each call is run. Every call of the plan is
            submitted at once, so that the endpoint's Triton can batch them. Default: a
            ThreadPoolExecutor per job with at most MAX_CALLS_IN_FLIGHT workers (one Triton
            batch). A scheduler may queue `fn`, run it later in any thread, or cancel its future
            (Future.cancel) while it is not running; each `fn` is safe to call from any thread.
        on_status(line): progress for the designer, e.g. "3 of 9 tiles done.", and the endpoint's
            retries ("<model> is loading…").
        on_result(index, result): each finished image of the job (index in seed order) with a
            GenerationResult of that one image, as soon as it is ready: a split image job reports
            every image as its call answers; a tiled image is reported once stitched; an edit's
            answer once pasted back.
        cancelled: a CancelSignal. Once set, calls not yet sent are never sent (a queued `fn`
            returns without calling the endpoint, a queued future is cancelled), calls already
            sent finish, and their images are kept: the result says `cancelled`.
        Both callbacks are called on the thread that called run_job, one at a time.

    events = job_events(client, plan, *, submit=None, cancelled=None, tick_s=None)
        The same job as a generator of events (Status, ImageDone, and a Tick when nothing else
        came for `tick_s`), returning the JobResult: what a Gradio handler streams from its own
        thread (studio.status). Closing it early stops sending, like a cancel.

Threads: one per call in flight (the scheduler's worker, or the executor's), and none of the
job's own. The caller's thread waits on one queue, into which the calls' status lines, their
futures' completion and a cancel are put as they happen: it never wakes up just to look (a Tick
is the designer's clock, not a check).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from sdserve.catalog import MAX_BATCH_SIZE

from studio.edits import EditPlan
from studio.errors import JobCancelled, StudioError
from studio.metadata import image_to_png
from studio.planning import JobPlan, PlannedCall
from studio.results import CallFailure, GenerationResult, JobResult, capitalized
from studio.tiles import min_overlap, stitch

# Calls of one job in flight at once with the default executor: one Triton batch (max_batch_size),
# and within botocore's default connection pool (10).
MAX_CALLS_IN_FLIGHT = MAX_BATCH_SIZE

StatusCallback = Callable[[str], None]
Submit = Callable[[Callable[[], GenerationResult]], concurrent.futures.Future]
ResultCallback = Callable[[int, GenerationResult], None]


class CancelSignal(threading.Event):
    """A threading.Event that also tells listeners when it is set, so that whoever waits for a
    job's calls hears of a cancel at once, without looking at the event every so often."""

    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[Callable[[], None]] = []
        self._listeners_lock = threading.Lock()

    def on_set(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` (on the setting thread) when the signal is set, at once if it is; returns
        a function that forgets it."""
        with self._listeners_lock:
            if not self.is_set():
                self._listeners.append(listener)
                return lambda: self._forget(listener)
        listener()
        return lambda: None

    def set(self) -> None:
        with self._listeners_lock:
            super().set()
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    def _forget(self, listener: Callable[[], None]) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


@dataclass(frozen=True)
class Status:
    """A status line for the designer."""

    line: str


@dataclass(frozen=True)
class ImageDone:
    """An image of the job is ready (stitched, pasted back): `index` in seed order."""

    index: int
    result: GenerationResult


class Tick:
    """Nothing happened for `tick_s`: time for the designer's clock to move."""


TICK = Tick()
_CANCEL = object()  # put in a job's queue when its CancelSignal is set


class _NotSent(Exception):
    """A queued call found its job cancelled (or its image already failed) and sent nothing."""


class _Unusable(Exception):
    """An answer that cannot be used (a tile not the size asked for, an edit answered with several images)."""

    def __init__(self, failure: CallFailure):
        super().__init__(str(failure))
        self.failure = failure


def run_job(
    client: Any,
    plan: JobPlan,
    *,
    submit: Submit | None = None,
    on_status: StatusCallback | None = None,
    on_result: ResultCallback | None = None,
    cancelled: CancelSignal | None = None,
) -> JobResult:
    """Send every call of `plan` at once and gather the answers (module docstring)."""
    events = job_events(client, plan, submit=submit, cancelled=cancelled)
    try:
        while True:
            event = next(events)
            if isinstance(event, Status) and on_status is not None:
                on_status(event.line)
            elif isinstance(event, ImageDone) and on_result is not None:
                on_result(event.index, event.result)
    except StopIteration as done:
        return done.value
    finally:
        events.close()  # a callback raised: send nothing more, let what was sent finish


def job_events(
    client: Any,
    plan: JobPlan,
    *,
    submit: Submit | None = None,
    cancelled: CancelSignal | None = None,
    tick_s: float | None = None,
) -> Generator[Status | ImageDone | Tick, None, JobResult]:
    """The job's events as they happen, and its JobResult at the end (module docstring)."""
    cancelled = cancelled or CancelSignal()
    started = time.monotonic()
    inbox: queue.SimpleQueue = queue.SimpleQueue()  # Status, (call, future) once done, or _CANCEL
    failed_images: set[int] = set()  # images with a failed tile: their other tiles are not sent
    stopping = threading.Event()  # the caller gave up (closed the generator)
    sent: list[int] = []
    single = not plan.is_split

    executor = None
    if submit is None:
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(MAX_CALLS_IN_FLIGHT, plan.call_count), thread_name_prefix=f"studio-{plan.task}"
        )
        submit = executor.submit

    def relay(call: PlannedCall) -> StatusCallback:
        if single:
            return lambda line: inbox.put(Status(line))
        return lambda line: inbox.put(Status(f"{capitalized(call.label)}: {line}"))

    def send(call: PlannedCall) -> GenerationResult:
        # Checked when the call is about to be sent, not when it was queued: a scheduler may hold
        # it for a while, and a cancelled job must not reach the endpoint any more.
        if cancelled.is_set() or stopping.is_set() or call.image_index in failed_images:
            raise _NotSent()
        sent.append(call.index)
        try:
            return client.invoke(plan.model, call.inputs, call.gen_args, on_status=relay(call),
                                 cancelled=cancelled, progress=single)
        except StudioError:
            if plan.layout is not None:
                # Marked here, in the worker, so that a scheduler's next call (maybe this image's
                # next tile, on this same thread) already sees it: a tile-less image is no result.
                failed_images.add(call.image_index)
            raise

    futures: list[concurrent.futures.Future] = []
    answers: dict[int, GenerationResult] = {}
    failures: dict[int, CallFailure] = {}
    not_sent: set[int] = set()
    images: dict[int, GenerationResult] = {}
    forget_cancel = cancelled.on_set(lambda: inbox.put(_CANCEL))
    try:
        for call in plan.calls:
            try:
                future = submit(lambda call=call: send(call))
            except Exception as error:  # a scheduler that refuses work fails that call, not the job
                failures[call.index] = CallFailure(call, StudioError(f"it could not be queued ({error})"))
                continue
            futures.append(future)
            future.add_done_callback(lambda done, call=call: inbox.put((call, done)))
        if plan.is_split:  # said once the calls are on their way: a consumer may take a while with it
            yield Status(f"Sending {plan.call_count} calls to {plan.model} at once…")

        finished = 0
        while finished < len(futures):
            try:
                item = inbox.get(timeout=tick_s)
            except queue.Empty:
                yield TICK
                continue
            if item is _CANCEL:
                for future in futures:
                    future.cancel()  # only succeeds for a future that has not started: not sent
                continue
            if isinstance(item, Status):
                yield item
                continue
            call, future = item
            finished += 1
            outcome = _outcome(future)
            if isinstance(outcome, GenerationResult):
                answers[call.index] = outcome
            elif isinstance(outcome, (_NotSent, JobCancelled)):
                not_sent.add(call.index)
            else:
                failures[call.index] = CallFailure(call, outcome)
                failed_images.add(call.image_index)
            # Once an image has a failed tile, its other tiles' news is noise: the failure was said.
            if plan.is_split and not (call.image_index in failed_images and call.index not in failures):
                yield Status(_progress(plan, call, outcome, answered=len(answers)))
            try:
                image = _image_if_done(plan, call.image_index, answers)
            except _Unusable as unusable:
                failures[unusable.failure.call.index] = unusable.failure
                failed_images.add(call.image_index)
                image = None
            if image is not None:
                images[call.image_index] = image
                yield ImageDone(call.image_index, image)
    except BaseException:  # closed early (GeneratorExit), or the consumer's error: send no more
        stopping.set()
        for future in futures:
            future.cancel()
        raise
    finally:
        forget_cancel()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    result = _assemble(plan, images, list(failures.values()), time.monotonic() - started)
    result.cancelled = bool(not_sent) and cancelled.is_set()
    result.calls_sent = len(sent)
    if plan.is_split:
        yield Status(f"{plan.model} answered {len(answers)} of {plan.call_count} calls in {result.seconds:.1f} s.")
    return result


def _outcome(future: concurrent.futures.Future) -> GenerationResult | BaseException:
    if future.cancelled():
        return _NotSent()
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, (StudioError, _NotSent)):
        return error
    return StudioError(f"it failed unexpectedly ({type(error).__name__}: {error})")


def _progress(plan: JobPlan, call: PlannedCall, outcome: object, *, answered: int) -> str:
    """The status line for a call that finished: progress in calls done, or what happened to it."""
    if isinstance(outcome, (_NotSent, JobCancelled)):
        return f"{capitalized(call.label)} was not sent: the job was cancelled."
    if isinstance(outcome, StudioError):
        return f"{capitalized(call.label)} failed: {outcome}"
    return f"{answered} of {plan.call_count} {plan.unit}s done."


def _image_if_done(plan: JobPlan, image_index: int, answers: dict[int, GenerationResult]) -> GenerationResult | None:
    """The image `image_index` once all its calls answered (stitched when tiled), else None."""
    calls = plan.calls_of_image(image_index)
    if not all(call.index in answers for call in calls):
        return None
    if plan.layout is None:
        return answers[calls[0].index] if plan.edit is None else _pasted(plan.edit, calls[0], answers[calls[0].index])
    tiles = [answers[call.index] for call in calls]
    layout = plan.layout
    for call, tile in zip(calls, tiles):
        if len(tile.images) != 1 or tile.images[0].size != layout.output_tile_size:
            width, height = layout.output_tile_size
            raise _Unusable(CallFailure(call, StudioError(
                f"its answer was not one {width}×{height} px image "
                f"(got {', '.join(f'{i.size[0]}×{i.size[1]}' for i in tile.images) or 'none'})")))
    stitched = stitch(layout, [tile.images[0] for tile in tiles])
    parameters = {
        **tiles[0].parameters,
        "seed": plan.seeds[image_index],
        "seeds": [plan.seeds[image_index]],
        "width": stitched.size[0],
        "height": stitched.size[1],
        # How it was made: enough to tell a stitched image from a one-call one, and to redo it.
        "tiles": {"count": layout.count, "tile": list(layout.tile_size), "min_overlap": min_overlap(layout)},
    }
    lossy = sorted({str(tile.parameters.get("encoding")) for tile in tiles} - {"png", "None"})
    if lossy:
        parameters["encoding"] = f"png, stitched from lossy tiles ({', '.join(lossy)})"
    return GenerationResult(model=plan.model, images=[stitched], png=[image_to_png(stitched, parameters)],
                            parameters=parameters, seconds=max(tile.seconds for tile in tiles))


def _pasted(edit: EditPlan, call: PlannedCall, answer: GenerationResult) -> GenerationResult:
    """An edit's answer put back into its image (studio.edits): only the masked pixels change."""
    if len(answer.images) != 1:
        raise _Unusable(CallFailure(call, StudioError(f"its answer was {len(answer.images)} images, not one")))
    pasted = edit.paste(answer.images[0])
    parameters = edit.parameters(answer.parameters)
    return GenerationResult(model=answer.model, images=[pasted], png=[image_to_png(pasted, parameters)],
                            parameters=parameters, seconds=answer.seconds)


def _assemble(
    plan: JobPlan, images: dict[int, GenerationResult], failures: list[CallFailure], seconds: float
) -> JobResult:
    order = sorted(images)
    if not plan.is_split and order:
        # One call: the endpoint's result as it came (bytes, parameters and all).
        only = images[order[0]]
        return JobResult(**{**vars(only), "seconds": seconds}, plan=plan, failures=failures, image_indices=order)
    made = [images[index] for index in order]
    parameters: dict[str, Any] = {}
    if made:
        parameters = {
            **made[0].parameters,
            "seed": plan.seeds[0],
            "seeds": [plan.seeds[index] for index in order],
            "num_images_per_prompt": plan.image_count,
        }
        if plan.variation_seeds:
            parameters["variation_seed"] = plan.variation_seeds[0]
            parameters["variation_seeds"] = [plan.variation_seeds[index] for index in order]
    return JobResult(
        model=plan.model,
        images=[image for part in made for image in part.images],
        png=[png for part in made for png in part.png],
        parameters=parameters,
        seconds=seconds,
        encoded=[data for part in made for data in part.encoded],
        plan=plan,
        failures=sorted(failures, key=lambda failure: failure.call.index),
        image_indices=order,
    )
