"""What the studio knows of its endpoint: each model's state, the wait a cold model costs, the
time and estimated cost of an image; and the warm-up calls "Send to" fires. No Gradio here.

Where the figures come from:

* On the local endpoint, its `GET /models` listing says which models are loaded (warm), being
  loaded, or not (cold), and how long the last load took. A call is never held for it: a call
  that starts with no fresh listing at hand is judged warm or cold when the listing, fetched
  meanwhile (one fetch at a time), arrives.
* On AWS there is no such listing, so the studio judges from its own recent calls: a model that
  answered within `warm_for_s` is warm (SageMaker keeps a model loaded until memory is needed,
  so a model idle longer may have been evicted: it counts as cold), one with a call in flight
  that found it cold (or was told "still loading") is loading. The wait a cold model costs is
  then a cold call's time minus what the same call takes warm (seconds per image of warm calls).
* Seconds per image: the median over the model's recent warm calls (warm-up calls left out).
* Cost per image: those seconds x the instance's on-demand price per hour (sdserve.instances),
  an estimate for images made one at a time (batched calls share the instance, and cost less).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sdserve.catalog import IMAGE, MASK_IMAGE, MODELS, MODELS_BY_TASK
from sdserve.checkpoint import FULL_SIZE_KIND, TINY_KIND
from sdserve.instances import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES, PRICES_REGION
from sdserve.params import STRENGTH

log = logging.getLogger(__name__)

WARM, LOADING, COLD = "warm", "loading", "cold"
# On AWS (no listing): how long after its last answer a model still counts as loaded.
WARM_FOR_S = 15 * 60
RECENT_CALLS = 20  # per model, the warm calls seconds per image are the median of
LISTING_MAX_AGE_S = 2.0  # one /models request serves every panel refreshed within this
LISTING_TIMEOUT_S = 2.0
# The local endpoint's model states, as the panel words them.
LISTED_STATES = {"loaded": WARM, "loading": LOADING}

# The smallest call every model takes (warm-up): the table's smallest image and fewest steps; a
# full strength, so an image-to-image model runs its one step rather than none.
WARM_UP_SIDE = int(MODELS_BY_TASK["generate"].argument("width").minimum)
WARM_UP_PROMPT = "warm-up"


# --- the price of an image ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pricing:
    """The hourly price images are estimated with: an instance type's, or one given."""

    instance_type: str = DEFAULT_INSTANCE_TYPE
    usd_per_hour: float | None = None  # None: the table's on-demand price for instance_type

    def __post_init__(self) -> None:
        if self.usd_per_hour is None and self.instance_type not in INSTANCE_TYPES:
            raise ValueError(
                f"no price known for {self.instance_type!r} (known: {', '.join(INSTANCE_TYPES)}); "
                "give one with --price-per-hour"
            )
        if self.usd_per_hour is not None and not self.usd_per_hour > 0:
            raise ValueError(f"a price per hour must be positive, got {self.usd_per_hour}")

    @property
    def hourly(self) -> float:
        return self.usd_per_hour if self.usd_per_hour is not None else INSTANCE_TYPES[self.instance_type].usd_per_hour

    @property
    def source(self) -> str:
        if self.usd_per_hour is not None:
            return f"{self.instance_type} at ${self.hourly:.3f}/h (the studio's --price-per-hour)"
        return f"{self.instance_type} at ${self.hourly:.3f}/h (on-demand, {PRICES_REGION})"

    def per_image(self, seconds_per_image: float) -> float:
        """Dollars for one image that keeps the instance busy `seconds_per_image`."""
        return seconds_per_image * self.hourly / 3600


# --- the state of each model ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelView:
    """One model as the panel shows it."""

    model: str
    state: str  # WARM, LOADING or COLD
    cold_wait_s: float | None  # what a cold call costs on top of a warm one; None: not measured yet
    seconds_per_image: float | None  # warm; None: no warm call yet
    cost_per_image: float | None  # dollars, an estimate


@dataclass
class _Calls:
    """One model's recent calls, as the studio made them."""

    in_flight: int = 0
    loading: int = 0  # calls in flight that found the model cold or were told it is loading
    last_answer: float | None = None  # clock time of the last successful answer
    per_image: deque = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))  # warm seconds per image
    cold_call: tuple[float, int] | None = None  # the latest call that found it cold: (seconds, images)
    cold_warm_up: bool = False  # ... and whether it was a warm-up (a step on the smallest image)

    @property
    def cold_wait_s(self) -> float | None:
        """The latest cold call's time less what its images take warm (a warm-up's work is nil)."""
        if self.cold_call is None:
            return None
        seconds, images = self.cold_call
        warm_s = 0.0 if self.cold_warm_up else _median(self.per_image)
        return None if warm_s is None else max(0.0, seconds - warm_s * images)


class Call:
    """One call to the endpoint, reported by the client: `loading()` when told the model is
    still loading, then `done(seconds, images)` or `failed()`."""

    def __init__(self, watch: EndpointWatch, model: str, warm_up: bool):
        self.watch, self.model, self.warm_up = watch, model, warm_up
        self.found_cold = False
        self.judged = False  # whether found_cold was decided (from the listing, or the calls)
        self.cold_by_calls = False  # what the studio's own calls said when it started
        self.listing: Future | None = None  # the listing it is judged by, on the local endpoint
        self.over = False
        watch._started(self)

    def loading(self) -> None:
        self.watch._loading(self)

    def done(self, seconds: float, images: int) -> None:
        self.watch._finished(self, seconds, images)

    def failed(self) -> None:
        self.watch._finished(self, None, 0)


# What the page calls each kind of random weights (the banner, the endpoint panel).
RANDOM_WEIGHTS_NAMES = {TINY_KIND: "tiny random weights", FULL_SIZE_KIND: "full-size random weights"}
RANDOM_WEIGHTS_MEANING = {
    TINY_KIND: "pipelines of a few MB: quick on a CPU, nothing like the real models' sizes or times",
    FULL_SIZE_KIND: "the real SD 2 architectures: the real models' sizes, memory and times",
}


class EndpointWatch:
    """Each model's state and figures, from the local endpoint's listing or the studio's own calls.

    `listing_url` is the local endpoint's `/models` (None on AWS); `random_weights` the kind of
    random weights it serves, where the studio knows (its own endpoint); `clock` is time.monotonic.
    """

    def __init__(self, pricing: Pricing = Pricing(), *, listing_url: str | None = None,
                 random_weights: str | None = None, warm_for_s: float = WARM_FOR_S,
                 clock: Callable[[], float] = time.monotonic):
        self.pricing, self.listing_url, self.warm_for_s, self.clock = pricing, listing_url, warm_for_s, clock
        self.random_weights = random_weights
        self._lock = threading.Lock()
        self._calls: dict[str, _Calls] = {model: _Calls() for model in MODELS}
        self._listing: tuple[float, dict[str, dict] | None] | None = None  # (when fetched, models by name)
        self._fetching: Future | None = None  # the listing asked for (or being fetched)
        self._fetch_asked = threading.Condition(self._lock)
        self._fetcher: threading.Thread | None = None

    # --- what the client reports -----------------------------------------------------------------

    def call(self, model: str, *, warm_up: bool = False) -> Call:
        return Call(self, model, warm_up)

    def _started(self, call: Call) -> None:
        listing = self._listing_future() if self.listing_url is not None else None
        with self._lock:
            calls = self._calls.setdefault(call.model, _Calls())
            # As judged by the calls before this one (a call sent while another loads the model
            # waits for that load too): on AWS, or when the listing cannot be had.
            call.cold_by_calls = self._state_from_calls(calls) != WARM
            if listing is None:
                self._judge(call, call.cold_by_calls)
            else:
                call.listing = listing
            calls.in_flight += 1
        if listing is not None:  # at once when the listing is fresh; else when the fetch under way ends
            listing.add_done_callback(lambda done: self._judge_by_listing(call, done.result()))

    def _judge_by_listing(self, call: Call, listed: dict[str, dict] | None) -> None:
        with self._lock:
            if listed is not None:
                self._judge(call, LISTED_STATES.get(listed.get(call.model, {}).get("state")) != WARM)
            else:  # no listing to be had: judged as on AWS
                self._judge(call, call.cold_by_calls)

    def _judge(self, call: Call, cold: bool) -> None:
        """Decide (once, under the lock) whether the call found its model cold."""
        if call.judged or call.over:
            return
        call.judged = True
        call.found_cold = call.found_cold or cold
        self._calls[call.model].loading += call.found_cold

    def _loading(self, call: Call) -> None:
        with self._lock:
            if not call.found_cold:
                call.found_cold = True
                self._calls[call.model].loading += call.judged  # counted now, or when judged

    def _finished(self, call: Call, seconds: float | None, images: int) -> None:
        if call.listing is not None:
            # Only a call quicker than the listing's fetch (started with it) waits here for it.
            self._judge_by_listing(call, call.listing.result())
        with self._lock:
            if call.over:
                return
            call.over = True
            calls = self._calls[call.model]
            calls.in_flight -= 1
            calls.loading -= call.found_cold
            if seconds is None:
                return
            calls.last_answer = self.clock()
            if call.found_cold:
                calls.cold_call, calls.cold_warm_up = (seconds, images), call.warm_up
            elif not call.warm_up and images:
                calls.per_image.append(seconds / images)

    # --- what the panel shows ----------------------------------------------------------------------

    def views(self) -> list[ModelView]:
        """Every model of the table, in its order."""
        listed = self._listed_models()
        with self._lock:
            return [self._view(model, self._calls[model], listed) for model in MODELS]

    def state(self, model: str) -> str:
        return next(view.state for view in self.views() if view.model == model)

    @property
    def source(self) -> str:
        """Where the states come from, in words."""
        if self.listing_url is not None and self._listed_models() is not None:
            return "the local endpoint's model listing"
        return f"the studio's own calls (a model that answered in the last {self.warm_for_s / 60:.0f} min counts as warm)"

    def _view(self, model: str, calls: _Calls, listed: dict[str, dict] | None) -> ModelView:
        per_image = _median(calls.per_image)
        cold_wait, state = calls.cold_wait_s, self._state_from_calls(calls)
        if listed is not None:
            entry = listed.get(model, {})
            state = LISTED_STATES.get(entry.get("state"), COLD)
            if isinstance(entry.get("load_seconds"), (int, float)) and state != LOADING:
                cold_wait = float(entry["load_seconds"])  # the endpoint's own measure of its last load
                if state == COLD and isinstance(entry.get("archive_seconds"), (int, float)):
                    # Its archive stays extracted on the endpoint's disk: loading it again pays the
                    # rest alone (a full-size model's download and extraction are a good part of it).
                    cold_wait = max(0.0, cold_wait - float(entry["archive_seconds"]))
        cost = None if per_image is None else self.pricing.per_image(per_image)
        return ModelView(model, state, cold_wait, per_image, cost)

    def _state_from_calls(self, calls: _Calls) -> str:
        if calls.loading:
            return LOADING
        if calls.in_flight or (calls.last_answer is not None and self.clock() - calls.last_answer < self.warm_for_s):
            return WARM
        return COLD

    def _listed_models(self) -> dict[str, dict] | None:
        """The local endpoint's models by name (a fresh enough copy); None when there is none."""
        return self._listing_future().result() if self.listing_url is not None else None

    def _listing_future(self) -> Future:
        """The listing: at hand when fetched within LISTING_MAX_AGE_S, else the fetch under way, asked
        for here when none is. One fetch at a time, by the watch's own thread (started once): no
        caller is held for it, nor for a thread to start."""
        with self._lock:
            if self._listing is not None and self.clock() - self._listing[0] < LISTING_MAX_AGE_S:
                fresh: Future = Future()
                fresh.set_result(self._listing[1])
                return fresh
            if self._fetching is None:
                self._fetching = Future()
                if self._fetcher is None:
                    self._fetcher = threading.Thread(target=self._fetch_when_asked, name="endpoint-listing",
                                                     daemon=True)
                    self._fetcher.start()
                self._fetch_asked.notify()
            return self._fetching

    def _fetch_when_asked(self) -> None:
        while True:
            with self._lock:
                while self._fetching is None or self._fetching.running():
                    self._fetch_asked.wait()
                future = self._fetching
                future.set_running_or_notify_cancel()
            models = _fetch_listing(self.listing_url)
            with self._lock:
                self._listing, self._fetching = (self.clock(), models), None
            future.set_result(models)


def _fetch_listing(url: str) -> dict[str, dict] | None:
    try:
        with urllib.request.urlopen(url, timeout=LISTING_TIMEOUT_S) as response:
            listing = json.load(response)
        return {entry["target_model"].removesuffix(".tar.gz"): entry for entry in listing["models"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.info("no model listing at %s (%s): states come from the studio's calls", url, error)
        return None


def _median(values) -> float | None:
    return statistics.median(values) if values else None


# --- warming up a model ---------------------------------------------------------------------------------


def warm_up_request(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, gen_args) of the smallest call `model` accepts, from the model table: one step on
    a WARM_UP_SIDE square (a grey image, a mask replacing all of it, where the model takes them)."""
    from PIL import Image

    spec = MODELS[model]
    inputs: dict[str, Any] = {"prompt": WARM_UP_PROMPT, "negative_prompt": ""}
    if spec.takes_image:
        inputs[IMAGE] = Image.new("RGB", (WARM_UP_SIDE, WARM_UP_SIDE), (128, 128, 128))
    if spec.takes_mask:
        inputs[MASK_IMAGE] = Image.new("L", (WARM_UP_SIDE, WARM_UP_SIDE), 255)
    gen_args: dict[str, Any] = {"num_inference_steps": int(spec.argument("num_inference_steps").minimum), "seed": 0}
    if not spec.takes_image:  # its size is the width and height arguments
        gen_args.update(width=WARM_UP_SIDE, height=WARM_UP_SIDE)
    if spec.strength_scales_steps:  # at full strength: the one step runs
        gen_args[STRENGTH] = spec.argument(STRENGTH).maximum
    return inputs, gen_args


class WarmUps:
    """Warm-up calls in the background, at most one in flight per model; none for a warm model.

    `send(model)` is the client's one-attempt call (see StudioClient.warm_up); it goes around the
    studio's scheduler and quotas: it is the studio's call, not a designer's job.
    """

    def __init__(self, watch: EndpointWatch, send: Callable[[str], object]):
        self.watch, self.send = watch, send
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()

    def request(self, model: str) -> str:
        """Start warming `model` up unless it is warm or warming; what happened, in words."""
        state = self.watch.state(model)
        with self._lock:
            if state == WARM:
                return f"{model} is loaded already."
            if model in self._in_flight or state == LOADING:
                return f"{model} is already being loaded."
            self._in_flight.add(model)
        threading.Thread(target=self._warm, args=(model,), name=f"warm-up {model}", daemon=True).start()
        return f"Loading {model} on the endpoint now, while you get the next step ready."

    def in_flight(self) -> set[str]:
        with self._lock:
            return set(self._in_flight)

    def _warm(self, model: str) -> None:
        try:
            self.send(model)
        except Exception as error:  # a warm-up that fails costs the designer nothing: logged only
            log.info("warm-up of %s did not finish: %s", model, error)
        finally:
            with self._lock:
                self._in_flight.discard(model)


# --- the panel, in words ---------------------------------------------------------------------------------

# Words, not coloured dots: a browser without an emoji font shows those as empty boxes.
STATE_WORDS = {WARM: "**warm**", LOADING: "loading…", COLD: "cold"}


def describe_endpoint(watch: EndpointWatch) -> str:
    """The endpoint panel as Markdown: a row per model, then where the figures come from."""
    rows = [
        "| Model | State | Cold start adds | Per image (warm) | Cost per image (estimate) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for view in watch.views():
        rows.append(
            f"| {MODELS[view.model].title} ({view.model}) | {STATE_WORDS[view.state]} "
            f"| {_seconds(view.cold_wait_s)} | {_seconds(view.seconds_per_image)} | {_dollars(view.cost_per_image)} |"
        )
    weights = ""
    if watch.random_weights in RANDOM_WEIGHTS_NAMES:
        name = RANDOM_WEIGHTS_NAMES[watch.random_weights]
        weights = f"**{name[0].upper()}{name[1:]}** ({RANDOM_WEIGHTS_MEANING[watch.random_weights]}); every image is noise.\n\n"
    return weights + "\n".join(rows) + (
        f"\n\nStates from {watch.source}. Times are measured on this endpoint (— until measured); a model "
        "loaded before loads again from the endpoint's disk, without its download. "
        f"**Costs are estimates**: seconds per image × {watch.pricing.source}, for images made one at "
        "a time (batched images share the instance and cost less)."
    )


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _dollars(value: float | None) -> str:
    return "—" if value is None else f"≈ ${value:.5f}"
