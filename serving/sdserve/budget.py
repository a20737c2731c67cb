"""How long a pipeline call will take, and the time one call may take.

A SageMaker invocation gets 60 s; part of that is spent queued in Triton (its queue policy
refuses a request that waited too long), the rest is the pipeline call's budget. Each loaded
model measures its own speed on its recent calls, so the same code knows a GPU from a CPU
without a table of hardware: the time of one denoising step per megapixel of images (from the
step callbacks), and the rest of a call (prompt encoding, VAE, ...). It predicts a call's time
from images x megapixels x steps before making it. A call predicted to run over is refused at
once, with what to lower; a call that runs over anyway is stopped at the step after which
another would end past the deadline.

Standard library only.
"""

from __future__ import annotations

import statistics
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .catalog import INVOCATION_SECONDS, MODELS
from .errors import RequestError

RECENT_CALLS = 8  # the calls of one size the fits are made from
SIZES_KEPT = 8  # sizes remembered, the most recently seen


class RecentBySize:
    """The latest seconds seen at each size (megapixels), for the most recently seen sizes.

    Kept per size so that a run of calls of one size (a crowd of small jobs) does not wash out
    what calls of other sizes taught: with one size left, there is no slope to fit.
    """

    def __init__(self) -> None:
        self._by_size: OrderedDict[float, deque[float]] = OrderedDict()

    def add(self, size: float, seconds: float) -> None:
        key = round(size, 4)
        self._by_size.setdefault(key, deque(maxlen=RECENT_CALLS)).append(seconds)
        self._by_size.move_to_end(key)
        if len(self._by_size) > SIZES_KEPT:
            self._by_size.popitem(last=False)

    def extend(self, seen: Iterable[tuple[float, float]]) -> None:
        for size, seconds in seen:
            self.add(size, seconds)

    def medians(self) -> list[tuple[float, float]]:
        """(size, the median of its seconds) for each size kept: one slow call does not move a fit."""
        return [(size, statistics.median(times)) for size, times in self._by_size.items()]

    def __bool__(self) -> bool:
        return bool(self._by_size)


def megapixels(size: tuple[int, int], images: int = 1) -> float:
    return images * size[0] * size[1] / 1e6


def _fitted(points: list[tuple[float, float]], image_megapixels: float, *, short: bool = False) -> float:
    """Seconds at `image_megapixels`, from one (megapixels, seconds) point per size seen:
    `a + b x megapixels` fitted to them.

    With one size seen there is no slope, only bounds (a and b are not negative): the guess errs
    long by default (what that size took, times the size ratio above it), or with `short` errs
    short (what that size took, times the size ratio below it)."""
    sizes = [size for size, _ in points]
    if len(points) < 2 or max(sizes) < 1.1 * min(sizes):  # one size seen: no slope to fit
        size, seconds = (min if short else max)(points, key=lambda point: point[1])
        ratio = image_megapixels / size
        return seconds * (min(1.0, ratio) if short else max(1.0, ratio))
    mean_size = sum(sizes) / len(sizes)
    mean_time = sum(seconds for _, seconds in points) / len(points)
    spread = sum((size - mean_size) ** 2 for size in sizes)
    slope = max(0.0, sum((size - mean_size) * (seconds - mean_time) for size, seconds in points) / spread)
    intercept = mean_time - slope * mean_size
    if intercept < 0:  # all of it scales with size
        intercept, slope = 0.0, mean_time / mean_size
    return intercept + slope * image_megapixels


@dataclass
class WorkBudget:
    """The time one pipeline call may take on this model, and its measured speed.

    A denoising step of a call costs `a + b x megapixels` (all its images together): `a` is what
    a step costs whatever the size (kernel launches, the scheduler; it dominates small images),
    `b` what each megapixel adds. Both are fitted to the median step time of each size among the
    recent calls. Until calls of two sizes are known, the guess errs long: a step costs at least
    what it does at the size seen, and at larger sizes (more rows in one call) that times the size
    ratio, as if all of it scaled with size. A guess too short would let a batch of tiles run past
    the deadline and be stopped, all of it lost; one too long only sends fewer rows per call,
    whose times then teach the fit. The rest of a call (prompt encoding, the VAE) is fitted the
    same way: the VAE's part grows with the images a call makes.
    """

    seconds: float
    # The rest of a call (besides its steps) until calls have been measured; given, it is held still.
    call_overhead_s: float | None = None
    # The model's first call, kept apart: it pays for warming up (kernels chosen and compiled,
    # memory allocated), several times what later calls take, so it is used only until they come.
    warm_up: tuple[float, float, float] | None = None  # (megapixels, step seconds, rest of the call)
    steps_seen: RecentBySize = field(default_factory=RecentBySize, repr=False)
    rest_seen: RecentBySize = field(default_factory=RecentBySize, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def step_seconds(self, image_megapixels: float, *, short: bool = False) -> float | None:
        with self._lock:
            points = self.steps_seen.medians()
        if not points and self.warm_up is not None:
            points = [self.warm_up[:2]]  # a cautious guess: warming up made it slow
        return _fitted(points, image_megapixels, short=short) if points else None

    def rest_seconds(self, image_megapixels: float, *, short: bool = False) -> float:
        """The rest of a call: prompt encoding (fixed) and the VAE (per image: a call of eight
        tiles decodes eight), fitted like the steps once calls have been seen."""
        with self._lock:
            points = self.rest_seen.medians()
        if points:
            return _fitted(points, image_megapixels, short=short)
        return self.call_overhead_s if self.call_overhead_s is not None else self.warm_up[2]

    def predict(self, image_megapixels: float, steps: int, *, short: bool = False) -> float | None:
        """Seconds a call will take, or None before the first measurement; erring long (how many
        rows to risk in one call) or, with `short`, erring short (whether to refuse a call)."""
        step = self.step_seconds(image_megapixels, short=short)
        if step is None:
            return None
        return self.rest_seconds(image_megapixels, short=short) + step * steps

    def record(self, image_megapixels: float, step_ends: list[float], started: float, ended: float) -> None:
        """Learn from one call: its start and end, and when each denoising step ended."""
        if image_megapixels <= 0 or len(step_ends) < 2:
            return  # one step cannot tell the step time from the rest of the call
        step_s = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
        overhead_s = max(0.0, (ended - started) - step_s * len(step_ends))
        with self._lock:
            if self.warm_up is None:
                self.warm_up = (image_megapixels, step_s, overhead_s)
                return
            self.steps_seen.add(image_megapixels, step_s)
            self.rest_seen.add(image_megapixels, overhead_s)

    def rows_that_fit(self, row_megapixels: float, steps: int, remaining_s: float, most: int) -> int:
        """How many rows of this size one call can make in `remaining_s` (at most `most`).

        Unmeasured, one: the first call of a model measures its speed (cautiously, see warm_up)
        before more are risked.
        """
        if self.predict(row_megapixels, steps) is None:
            return 1
        fitting = 0
        while fitting < most and self.predict(row_megapixels * (fitting + 1), steps) <= remaining_s:
            fitting += 1
        if fitting == 0 and (not self.measured or self.predict(row_megapixels, steps, short=True) <= remaining_s):
            # Not surely too long (known from the warm-up alone, or a size not seen yet): one row
            # goes and measures the model's real speed; the deadline stops it if it is too long.
            return 1
        return fitting

    def words(self) -> str:
        """The budget as messages name it: a pipeline call's share of an invocation, not all of it."""
        return f"the {self.seconds:.0f} s a pipeline call may take of an invocation's {INVOCATION_SECONDS} s"

    @property
    def measured(self) -> bool:
        """Whether calls after the warm-up have been measured (only their speed is trusted to refuse)."""
        with self._lock:
            return bool(self.steps_seen)

    def refusal(self, model: str, args: dict[str, Any], image_megapixels: float) -> RequestError | None:
        """A RequestError naming what to lower when a call alone cannot fit the budget, else None."""
        spec = MODELS[model]
        predicted = self.predict(image_megapixels, spec.denoising_steps(args), short=True)
        if predicted is None or predicted <= self.seconds or not self.measured:
            return None
        return CallOverBudget(
            "gen_args",
            f"this call would take about {predicted:.0f} s on {model} here, over {self.words()}; "
            f"lower {spec.what_to_lower(args)}",
        )


class CallOverBudget(RequestError):
    """A call that cannot (or did not) finish within the time one invocation may take."""


# Words every ModelBusy message carries: Triton's SageMaker listener answers every failed call
# with 400, so a client tells "try again" from "change the request" by these (studio.client).
BUSY_WORDS = "is busy, try again"


class ModelBusy(Exception):
    """A call that fits the budget alone, but not in what the calls batched before it left:
    answered as unavailable (503 on Triton's own port), and retried by the studio's client."""

    def __init__(self, model: str, budget_s: float):
        super().__init__(
            f"{model} {BUSY_WORDS}: the calls batched before this one took this invocation's {budget_s:.0f} s"
        )

