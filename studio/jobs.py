"""Jobs that do not fit one InvokeEndpoint call: planned first, then sent as several calls at once.

SageMaker caps one InvokeEndpoint answer (like the request) at MAX_PAYLOAD_BYTES (6,291,456
bytes) and one invocation at 60 s. So the client splits:

* several images (`num_images_per_prompt` N > 1) into N calls of one image each, seeds s, s+1,
  ... (a seed of -1 is made a random seed here first, so the job's seeds are consecutive as the
  server makes them); each image is reported as soon as its call answers;
* an x4 upscale (a model whose `output_scale` > 1) of an image larger than one tile into
  overlapping tiles of UPSCALE_TILE_SIDE px, every tile with the job's seed, stitched in output
  space with feathered seams. An image that fits one tile is sent as one call, untouched, and
  its result is the endpoint's own, byte for byte.

Erase and Extend (studio.edits) are one call per image too: what is sent is the box around
their mask at its work size, and each answer is pasted back into the input through the mask
before it is reported (`JobPlan.edit`).

The interface (all of it usable without Gradio):

    plan = plan_job(task, prompt, negative_prompt, *, image=None, mask=None, gen_args={...})
        Pure (no network): validates the arguments, resolves seed -1, cuts tiles and says how
        many calls the job takes and why, naming the limit: `plan.call_count`, `plan.seeds`,
        `plan.summary` ("Upscale: sent as 9 calls at once. The 512×512 px image becomes
        2048×2048 px; one answer from the endpoint may carry at most 6 MB ...").

    result = client.run_job(plan, *, submit=None, on_status=None, on_result=None, cancelled=None)
        Blocks until every call that was sent has answered; returns a JobResult (never raises for
        a failed call: the failures are in `result.failures`).
        submit(fn) -> concurrent.futures.Future: how each call is run. Every call of the plan is
            submitted at once, so that the endpoint's Triton can batch them. Default: a
            ThreadPoolExecutor per job with at most MAX_CALLS_IN_FLIGHT workers (one Triton
            batch). A scheduler may queue `fn`, run it later in any thread, or cancel its future
            (Future.cancel) while it is not running; each `fn` is safe to call from any thread.
        on_status(line): progress for the designer, e.g. "3 of 9 tiles done.", and the endpoint's
            retries ("<model> is loading…").
        on_result(index, result): each finished image of the job (index in seed order) with a
            GenerationResult of that one image, as soon as it is ready: a split image job reports
            every image as its call answers; a tiled image is reported once stitched.
        cancelled: a threading.Event. Once set, calls not yet sent are never sent (a queued `fn`
            returns without calling the endpoint, a queued future is cancelled), calls already
            sent finish, and their images are kept: the result says `cancelled`.
        Both callbacks are called on the thread that called run_job, one at a time.

    result.raise_for_errors()
        The result when every call succeeded; else StudioError (nothing was made: for a one-call
        job, the call's own error, unchanged) or PartialJobError (a StudioError whose `result`
        carries the images made; its message says which calls failed and why the job was
        split). A tiled image with a failed tile is not made at all: an upscale with a hole is no
        result, so its remaining tiles are not sent.

`StudioClient.generate/restyle/erase/upscale` are `plan_job` + `run_job` + `raise_for_errors`.
For the studio's input checks, `max_input_side(spec)` is the largest image side a model takes
through the client (MAX_TILED_INPUT_SIDE, 1024 px, for the upscaler).
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import Any

import numpy as np
from PIL import Image
from sdserve.catalog import (
    IMAGE,
    MASK_IMAGE,
    MAX_BATCH_SIZE,
    MIN_IMAGE_SIDE,
    MODELS_BY_TASK,
    NEGATIVE_PROMPT,
    PROMPT,
    SIZE_MULTIPLE,
    ModelSpec,
)
from sdserve.errors import RequestError
from sdserve.params import SEED_MAX, image_seeds, random_seed

from studio.client import (
    INVOCATION_LIMIT_S,
    MAX_ANSWER_BYTES,
    GenerationResult,
    JobCancelled,
    StatusCallback,
    StudioClient,
    StudioError,
    png_with_parameters,
)
from studio.edits import EDIT_TOOLS, EditPlan, plan_edit

# --- the limits a job is split by --------------------------------------------------------------

# What an answer carries besides the pixels, reserved out of MAX_ANSWER_BYTES: the KServe JSON
# around the images, the parameters (twice per image: the PNG's text chunk and the "parameters"
# output, each with prompt and negative prompt of up to 4000 characters, \u-escaped and escaped
# again inside JSON: about 240 KB at worst), and PNG/zlib framing.
ANSWER_OVERHEAD_BYTES = 512 * 1024

# Input side of one upscale tile. Its x4 output, 1024x1024, is at worst (noise does not compress:
# budget the raw RGB) 3 MiB of pixels, 4 MiB as base64: within MAX_ANSWER_BYTES with 2 MiB to spare
# for ANSWER_OVERHEAD_BYTES, so every tile answer fits as lossless PNG. 1024x1024 is also the
# largest image the endpoint already makes in one call (generate at 1024 px), so one tile costs no
# more time or GPU memory than calls it is sized for within the 60 s limit. (The largest multiple
# of 8 that still fits is 296 px; it would leave ~0.4 MB of headroom and make calls heavier than any
# other, for 4 calls instead of 9 at 512 px and the same 25 at 1024 px.)
UPSCALE_TILE_SIDE = 256
# Minimum overlap of neighbouring tiles, in input px (x4 = 256 output px of feathered seam). 64 is
# the most that keeps a 1024 px side at 5 tiles ((1024 - 64) / (256 - 64) = 5): the widest seam
# blend that costs no extra call at the studio's largest input. (512 px takes 3 per side with any
# overlap; both sides are then 9 and 25 calls.)
UPSCALE_TILE_OVERLAP = 64
# The largest input side a tiled model accepts through the client (its output: 4096 px a side);
# the server's own per-call limit (ModelSpec.max_image_side, 512 for the upscaler) is above a tile.
MAX_TILED_INPUT_SIDE = 1024
# Calls of one job in flight at once with the default executor: one Triton batch (max_batch_size),
# and within botocore's default connection pool (10).
MAX_CALLS_IN_FLIGHT = MAX_BATCH_SIZE
# Output rows stitched at a time (bounds the float accumulator to ~25 MB for a 4096 px wide image).
STITCH_BAND_ROWS = 256
_POLL_S = 0.1  # how often a waiting run_job looks at `cancelled`

Submit = Callable[[Callable[[], GenerationResult]], concurrent.futures.Future]
ResultCallback = Callable[[int, GenerationResult], None]


def _megabytes(size: int) -> str:
    return f"{size / 2**20:g} MB"


def worst_case_answer_bytes(width: int, height: int) -> int:
    """The largest answer one image of `width` x `height` can take: raw RGB (noise does not
    compress) plus PNG's filter byte per row, as base64, plus ANSWER_OVERHEAD_BYTES."""
    raw = width * height * 3 + height
    return 4 * math.ceil(raw / 3) + ANSWER_OVERHEAD_BYTES


def max_input_side(spec: ModelSpec) -> int | None:
    """The largest input image side a model takes through the client: tiled models take
    MAX_TILED_INPUT_SIDE, the others their own limit (None for a model that takes no image)."""
    return MAX_TILED_INPUT_SIDE if spec.output_scale > 1 else spec.max_image_side


# --- tiles -------------------------------------------------------------------------------------


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of side `tile` covering [0, length) with neighbours overlapping by
    at least `overlap`, spread evenly (so every tile is whole: the last ends at `length`)."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    # Even spacing: steps of at most tile - overlap (count was chosen so), rounded to whole pixels.
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


@dataclass(frozen=True)
class TileLayout:
    """Tiles over an input image of `size`; boxes row by row, in input pixels."""

    size: tuple[int, int]  # (width, height) of the image the tiles are cut from
    tile_size: tuple[int, int]  # (width, height) of every tile
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    scale: int  # output px per input px

    @classmethod
    def for_image(cls, size: tuple[int, int], tile: int, overlap: int, scale: int) -> TileLayout:
        width, height = size
        tile_size = (min(tile, width), min(tile, height))
        return cls(size, tile_size, tuple(tile_positions(width, tile, overlap)),
                   tuple(tile_positions(height, tile, overlap)), scale)

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each tile, row by row, as PIL's crop takes them."""
        width, height = self.tile_size
        return [(x, y, x + width, y + height) for y in self.ys for x in self.xs]

    @property
    def output_size(self) -> tuple[int, int]:
        return self.size[0] * self.scale, self.size[1] * self.scale

    @property
    def output_tile_size(self) -> tuple[int, int]:
        return self.tile_size[0] * self.scale, self.tile_size[1] * self.scale


def axis_weights(starts: Sequence[int], tile: int, length: int) -> list[np.ndarray]:
    """Blend weights along one axis (output pixels): per tile, one weight per pixel it covers.

    Each tile's weight ramps linearly from ~0 to 1 across its overlap with the neighbour on that
    side (no ramp at the image's border, so edges keep their own tile), and the weights are then
    normalized to sum to exactly 1 at every pixel: where tiles agree the result is their value,
    where they differ it fades from one to the other across the overlap.
    """
    centres = np.arange(tile) + 0.5  # pixel centres, so no weight is 0 and no pixel is dropped
    weights = []
    for index, start in enumerate(starts):
        weight = np.ones(tile)
        if index > 0 and (ramp := starts[index - 1] + tile - start) > 0:
            weight = np.minimum(weight, centres / ramp)
        if index < len(starts) - 1 and (ramp := start + tile - starts[index + 1]) > 0:
            weight = np.minimum(weight, (tile - centres) / ramp)
        weights.append(weight)
    total = np.zeros(length)
    for start, weight in zip(starts, weights):
        total[start : start + tile] += weight
    return [weight / total[start : start + tile] for start, weight in zip(starts, weights)]


def stitch(layout: TileLayout, tiles: Sequence[Image.Image]) -> Image.Image:
    """The output image from its tiles' outputs (row by row, as `layout.boxes`), seams feathered."""
    out_width, out_height = layout.output_size
    tile_width, tile_height = layout.output_tile_size
    xs = [x * layout.scale for x in layout.xs]
    ys = [y * layout.scale for y in layout.ys]
    column_weights = axis_weights(xs, tile_width, out_width)
    row_weights = axis_weights(ys, tile_height, out_height)
    rgb = [tile.convert("RGB") for tile in tiles]
    output = np.empty((out_height, out_width, 3), dtype=np.uint8)
    # A band of output rows at a time, in float64 (exact: weights summing to 1 give back equal
    # values to well within rounding), so a 4096 px image never holds a full float copy.
    for top in range(0, out_height, STITCH_BAND_ROWS):
        bottom = min(top + STITCH_BAND_ROWS, out_height)
        band = np.zeros((bottom - top, out_width, 3))
        for row, y in enumerate(ys):
            first, last = max(top, y), min(bottom, y + tile_height)
            if first >= last:
                continue
            row_weight = row_weights[row][first - y : last - y]
            for column, x in enumerate(xs):
                tile = rgb[row * len(xs) + column].crop((0, first - y, tile_width, last - y))
                pixels = np.asarray(tile, dtype=np.float64)
                weight = row_weight[:, None] * column_weights[column][None, :]
                band[first - top : last - top, x : x + tile_width] += pixels * weight[:, :, None]
        output[top:bottom] = np.clip(np.rint(band), 0, 255).astype(np.uint8)
    return Image.fromarray(output, "RGB")


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedCall:
    """One InvokeEndpoint call of a job: exactly what is sent, and what it is part of."""

    index: int  # position in JobPlan.calls
    image_index: int  # which image of the job it makes, or makes a tile of
    tile_index: int | None  # its tile in JobPlan.layout.boxes; None when not tiled
    label: str  # "image 2 of 4", "tile 3 of 9", "image 2 of 4, tile 3 of 9", or "the call"
    inputs: dict[str, str | Image.Image]
    gen_args: dict[str, Any]

    @property
    def seed(self) -> int:
        return self.gen_args["seed"]


@dataclass(frozen=True)
class JobPlan:
    """What a job will send: its calls, the seed of each image, and why it is split."""

    task: str
    model: str
    title: str  # the task's title, for messages ("Upscale")
    seeds: tuple[int, ...]  # one per image of the job, in order
    calls: tuple[PlannedCall, ...]
    layout: TileLayout | None = None  # the tiles, when the image is tiled
    reasons: tuple[str, ...] = ()  # why it is split, naming the limit; empty for one call
    edit: EditPlan | None = None  # for Erase and Extend: what is sent, and how answers are pasted back
    variation_seeds: tuple[int, ...] = ()  # one per image of a job of variations

    @property
    def call_count(self) -> int:
        return len(self.calls)

    @property
    def image_count(self) -> int:
        return len(self.seeds)

    @property
    def is_split(self) -> bool:
        return len(self.calls) > 1

    @property
    def unit(self) -> str:
        """What one call makes, for progress lines: "tile", "image" or (images of tiles) "call"."""
        if self.layout is None:
            return "image"
        return "tile" if self.image_count == 1 else "call"

    @property
    def summary(self) -> str:
        """What will be sent and why, for the designer, before anything is sent."""
        if not self.is_split:
            return f"{self.title}: one call to the endpoint."
        return f"{self.title}: sent as {self.call_count} calls at once. " + " ".join(self.reasons)

    def calls_of_image(self, image_index: int) -> list[PlannedCall]:
        return [call for call in self.calls if call.image_index == image_index]


def plan_job(
    task: str,
    prompt: str = "",
    negative_prompt: str = "",
    *,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    gen_args: Mapping[str, Any] | None = None,
    tile_side: int = UPSCALE_TILE_SIDE,
    tile_overlap: int = UPSCALE_TILE_OVERLAP,
    rng: Random | None = None,
    settings: Mapping[str, Any] | None = None,
) -> JobPlan:
    """The calls a job takes, without sending anything. Refuses (StudioError) unknown or bad
    arguments and images over max_input_side. `tile_side`/`tile_overlap` (input px) exist for
    tests and tuning; a tile side whose worst-case answer exceeds MAX_ANSWER_BYTES is refused.
    `rng` picks the seed for -1 (default: the secrets module, as the server does).
    `task` may also be an edit tool of studio.edits ("erase", "extend"): `settings` are then its
    studio-side settings, the calls carry the box it sends, and each answer is pasted back.
    """
    tool = EDIT_TOOLS.get(task)
    spec = tool.spec if tool is not None else MODELS_BY_TASK[task]
    title = tool.title if tool is not None else spec.title
    if settings and tool is None:
        raise StudioError(f"{task} takes no studio-side settings; it was given {', '.join(sorted(settings))}.")
    gen_args = dict(gen_args or {})
    unknown = sorted(set(gen_args) - set(spec.argument_names))
    if unknown:
        raise StudioError(f"{task} takes no argument {unknown[0]!r}; it takes {', '.join(spec.argument_names)}.")
    for name, value in gen_args.items():
        try:
            gen_args[name] = spec.argument(name).check(value)  # the server's own check, same words
        except RequestError as error:
            raise StudioError(f"{error}.") from None
    count = gen_args.get("num_images_per_prompt", spec.argument("num_images_per_prompt").default)
    pick_seed = (lambda: rng.randint(0, SEED_MAX)) if rng is not None else random_seed
    # Each image's seeds, counted exactly as sdserve.batch does for one call (-1 resolved once, here).
    each_image = image_seeds({**gen_args, "num_images_per_prompt": count}, pick_seed)
    seeds = tuple(image["seed"] for image in each_image)
    variation_seeds = tuple(image["variation_seed"] for image in each_image if "variation_seed" in image)

    inputs: dict[str, str | Image.Image] = {PROMPT: prompt, NEGATIVE_PROMPT: negative_prompt}
    if spec.takes_image:
        inputs[IMAGE] = image
    if spec.takes_mask:
        inputs[MASK_IMAGE] = mask

    layout = None
    edit = None
    reasons: list[str] = []
    if spec.takes_image and isinstance(image, Image.Image):
        width, height = image.size
        limit = max_input_side(spec)
        if limit and max(width, height) > limit:
            raise StudioError(
                f"The image is {width}×{height} px; {title} accepts at most {limit} px a side. "
                "Make it smaller first."
            )
        if tool is not None:
            edit = plan_edit(tool, image, mask, settings, limit)
            inputs[IMAGE], inputs[MASK_IMAGE] = edit.call_image, edit.call_mask
        # Sides as the server will use them (it resizes down to multiples of 8): an image that
        # fits one tile then is sent as one call, untouched.
        if spec.output_scale > 1 and max(width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE) > tile_side:
            layout, tiles = _tiles(spec, image, tile_side, tile_overlap)
            out_width, out_height = layout.output_size
            tile_out = tile_side * spec.output_scale
            reasons.append(
                f"The {width}×{height} px image becomes {out_width}×{out_height} px; one answer from the endpoint "
                f"may carry at most {_megabytes(MAX_ANSWER_BYTES)} and only {tile_out}×{tile_out} px is sure to fit, "
                f"so it is upscaled in {layout.count} overlapping tiles of "
                f"{layout.tile_size[0]}×{layout.tile_size[1]} px "
                f"({len(layout.xs)}×{len(layout.ys)}), blended where they overlap."
            )

    if count > 1:
        calls_of = "its own calls" if layout is not None else "its own call"
        numbered = (f"seed {seeds[0]}, variation seeds {variation_seeds[0]} to {variation_seeds[-1]}"
                    if variation_seeds else f"seeds {seeds[0]} to {seeds[-1]}")
        reasons.append(
            f"Each of the {count} images ({numbered}) is {calls_of}, so every answer stays "
            f"within the endpoint's {_megabytes(MAX_ANSWER_BYTES)} answer limit, every call does one image's work "
            f"(SageMaker allows a call {INVOCATION_LIMIT_S} s), and each image shows when it is ready."
        )

    calls: list[PlannedCall] = []
    for image_index, image_seed in enumerate(each_image):
        image_label = f"image {image_index + 1} of {count}" if count > 1 else ""
        if layout is None:
            if count == 1:
                # Sent as the caller gave it, only the seeds resolved: the same request as before splitting.
                args = {**gen_args, **image_seed}
            else:
                args = {**gen_args, **image_seed, "num_images_per_prompt": 1}
            calls.append(PlannedCall(len(calls), image_index, None, image_label or "the call", inputs, args))
            continue
        args = {**gen_args, **image_seed, "num_images_per_prompt": 1}  # every tile: its image's seeds
        for tile_index, tile in enumerate(tiles):
            label = f"tile {tile_index + 1} of {layout.count}"
            calls.append(PlannedCall(len(calls), image_index, tile_index, ", ".join(filter(None, (image_label, label))),
                                     {**inputs, IMAGE: tile}, args))
    return JobPlan(task, spec.name, title, seeds, tuple(calls), layout,
                   tuple(reasons), edit, variation_seeds)


def _tiles(spec: ModelSpec, image: Image.Image, tile_side: int, overlap: int) -> tuple[TileLayout, list[Image.Image]]:
    if tile_side % SIZE_MULTIPLE or tile_side < MIN_IMAGE_SIDE or not 0 <= overlap < tile_side:
        raise ValueError(f"tile side {tile_side} / overlap {overlap}: the side must be a multiple of "
                         f"{SIZE_MULTIPLE} from {MIN_IMAGE_SIDE}, the overlap from 0 to less than the side")
    tile_out = tile_side * spec.output_scale
    if worst_case_answer_bytes(tile_out, tile_out) > MAX_ANSWER_BYTES:
        raise ValueError(f"a {tile_side} px tile's answer ({tile_out} px) can exceed {MAX_ANSWER_BYTES} bytes")
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise StudioError(f"The image is {width}×{height} px; {spec.title} needs at least {MIN_IMAGE_SIDE} px a side.")
    # The server resizes an image down to multiples of 8 (LANCZOS) before upscaling; doing the same
    # here first gives the untiled output size and tiles it will not resize again.
    image = image.convert("RGB")
    snapped = (width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE)
    if snapped != image.size:
        image = image.resize(snapped, Image.Resampling.LANCZOS)
    layout = TileLayout.for_image(snapped, tile_side, overlap, spec.output_scale)
    return layout, [image.crop(box) for box in layout.boxes]


# --- the result --------------------------------------------------------------------------------


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class CallFailure:
    """A call that was sent (or could not be queued) and did not give a usable answer."""

    call: PlannedCall
    error: StudioError

    def __str__(self) -> str:
        text = f"{_capitalized(self.call.label)} (seed {self.call.seed}) failed: {self.error}"
        return text if text.endswith(".") else text + "."


@dataclass
class JobResult(GenerationResult):
    """A job's images (those made, in seed order) and what went wrong with the rest.

    `parameters` are the first image's, with the job's `seed`, the made images' `seeds` and the
    job's `num_images_per_prompt`; each PNG carries its own image's parameters.
    """

    plan: JobPlan | None = None
    failures: list[CallFailure] = field(default_factory=list)
    cancelled: bool = False
    calls_sent: int = 0
    image_indices: list[int] = field(default_factory=list)  # each image's index in the job

    @property
    def complete(self) -> bool:
        return not self.failures and not self.cancelled

    def problem(self) -> str | None:
        """What went wrong, for the designer; None when nothing did."""
        if self.complete:
            return None
        plan = self.plan
        total = plan.image_count if plan else len(self.images)
        lines = []
        if total > 1:
            lines.append(f"{len(self.images)} of {total} images were made.")
        elif plan and plan.layout is not None and self.failures:
            lines.append(f"The {plan.title.lower()} failed and nothing was kept: "
                         "an image with a missing tile would have a hole.")
        if self.cancelled:
            calls = plan.call_count if plan else self.calls_sent
            lines.append(f"Cancelled after {self.calls_sent} of {calls} calls were sent; the rest were not sent.")
        # The same reason once, with the calls it stopped: a refused job fails every call alike.
        by_reason: dict[str, list[CallFailure]] = {}
        for failure in self.failures:
            by_reason.setdefault(str(failure.error), []).append(failure)
        for reason, failures in list(by_reason.items())[:3]:
            if len(failures) == 1:
                lines.append(str(failures[0]))
            else:
                labels = ", ".join(failure.call.label for failure in failures)
                lines.append(_capitalized(f"{labels} failed: {reason}".rstrip(".") + "."))
        if len(by_reason) > 3:
            lines.append(f"{sum(len(f) for f in list(by_reason.values())[3:])} more calls failed.")
        if total > 1 and plan and plan.layout is not None and self.failures:
            lines.append("An image with a failed tile is not kept: it would have a hole.")
        if plan and plan.is_split and self.failures:
            lines.append(plan.summary)  # why it was split, naming the limit
        return " ".join(lines)

    def raise_for_errors(self) -> JobResult:
        """This result if nothing went wrong; else StudioError (nothing made) or PartialJobError."""
        if self.complete:
            return self
        if not self.images:
            if len(self.failures) == 1 and self.plan is not None and not self.plan.is_split:
                raise self.failures[0].error  # a one-call job fails with the call's own words
            if self.cancelled and not self.failures:
                raise JobCancelled(self.problem() or "Cancelled.")
            raise StudioError(self.problem() or "Nothing was made.")
        raise PartialJobError(self.problem() or "", result=self)


class PartialJobError(StudioError):
    """Some of a job's images were made and some were not: `result` carries those made (show
    them), `str(error)` says what failed and why the job was split."""

    def __init__(self, message: str, *, result: JobResult):
        super().__init__(message)
        self.result = result


# --- running a plan ----------------------------------------------------------------------------


class _NotSent(Exception):
    """A queued call found its job cancelled (or its image already failed) and sent nothing."""


def run_job(
    client: StudioClient,
    plan: JobPlan,
    *,
    submit: Submit | None = None,
    on_status: StatusCallback | None = None,
    on_result: ResultCallback | None = None,
    cancelled: threading.Event | None = None,
) -> JobResult:
    """Send every call of `plan` at once through `submit` and gather the answers (module docstring)."""
    notify = on_status or (lambda line: None)
    cancelled = cancelled or threading.Event()
    started = time.monotonic()
    events: queue.Queue = queue.Queue()  # ("status", call, line) from workers, ("done", call, future)
    failed_images: set[int] = set()  # images with a failed tile: their other tiles are not sent
    stop = threading.Event()  # set when run_job itself gives up (a callback raised)
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
            return lambda line: events.put(("status", call, line))
        return lambda line: events.put(("status", call, f"{_capitalized(call.label)}: {line}"))

    def send(call: PlannedCall) -> GenerationResult:
        # Checked when the call is about to be sent, not when it was queued: a scheduler may hold
        # it for a while, and a cancelled job must not reach the endpoint any more.
        if cancelled.is_set() or stop.is_set() or call.image_index in failed_images:
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

    if plan.is_split:
        notify(f"Sending {plan.call_count} calls to {plan.model} at once…")
    futures: list[concurrent.futures.Future] = []
    answers: dict[int, GenerationResult] = {}
    failures: dict[int, CallFailure] = {}
    not_sent: set[int] = set()
    images: dict[int, GenerationResult] = {}
    try:
        for call in plan.calls:
            try:
                future = submit(lambda call=call: send(call))
            except Exception as error:  # a scheduler that refuses work fails that call, not the job
                failures[call.index] = CallFailure(call, StudioError(f"it could not be queued ({error})"))
                continue
            futures.append(future)
            future.add_done_callback(lambda done, call=call: events.put(("done", call, done)))

        finished = 0
        while finished < len(futures):
            try:
                kind, call, payload = events.get(timeout=_POLL_S)
            except queue.Empty:
                kind = None
            if cancelled.is_set():
                for future in futures:
                    future.cancel()  # only succeeds for a future that has not started: not sent
            if kind is None:
                continue
            if kind == "status":
                notify(payload)
                continue
            finished += 1
            outcome = _outcome(payload)
            if isinstance(outcome, GenerationResult):
                answers[call.index] = outcome
            elif isinstance(outcome, (_NotSent, JobCancelled)):
                not_sent.add(call.index)
            else:
                failures[call.index] = CallFailure(call, outcome)
                failed_images.add(call.image_index)
            # Once an image has a failed tile, its other tiles' news is noise: the failure was said.
            if plan.is_split and not (call.image_index in failed_images and call.index not in failures):
                notify(_progress(plan, call, outcome, answered=len(answers)))
            try:
                image = _image_if_done(plan, call.image_index, answers)
            except _Unusable as unusable:
                failures[unusable.failure.call.index] = unusable.failure
                failed_images.add(call.image_index)
                image = None
            if image is not None:
                images[call.image_index] = image
                if on_result is not None:
                    on_result(call.image_index, image)
    except BaseException:
        stop.set()  # a callback raised: send nothing more, let what was sent finish
        for future in futures:
            future.cancel()
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    result = _assemble(plan, images, list(failures.values()), time.monotonic() - started)
    result.cancelled = bool(not_sent) and cancelled.is_set()
    result.calls_sent = len(sent)
    if plan.is_split:
        notify(f"{plan.model} answered {len(answers)} of {plan.call_count} calls in {result.seconds:.1f} s.")
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
        return f"{_capitalized(call.label)} was not sent: the job was cancelled."
    if isinstance(outcome, StudioError):
        return f"{_capitalized(call.label)} failed: {outcome}"
    return f"{answered} of {plan.call_count} {plan.unit}s done."


class _Unusable(Exception):
    """A tile's answer that cannot be stitched (not the size asked for)."""

    def __init__(self, failure: CallFailure):
        super().__init__(str(failure))
        self.failure = failure


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
    first = tiles[0].parameters
    parameters = {
        **first,
        "seed": plan.seeds[image_index],
        "seeds": [plan.seeds[image_index]],
        "width": stitched.size[0],
        "height": stitched.size[1],
        # How it was made: enough to tell a stitched image from a one-call one, and to redo it.
        "tiles": {"count": layout.count, "tile": list(layout.tile_size), "min_overlap": _min_overlap(layout)},
    }
    lossy = sorted({str(tile.parameters.get("encoding")) for tile in tiles} - {"png", "None"})
    if lossy:
        parameters["encoding"] = f"png, stitched from lossy tiles ({', '.join(lossy)})"
    return GenerationResult(model=plan.model, images=[stitched], png=[png_with_parameters(stitched, parameters)],
                            parameters=parameters, seconds=max(tile.seconds for tile in tiles))


def _pasted(edit: EditPlan, call: PlannedCall, answer: GenerationResult) -> GenerationResult:
    """An edit's answer put back into its image (studio.edits): only the masked pixels change."""
    if len(answer.images) != 1:
        raise _Unusable(CallFailure(call, StudioError(f"its answer was {len(answer.images)} images, not one")))
    pasted = edit.paste(answer.images[0])
    parameters = edit.parameters(answer.parameters)
    return GenerationResult(model=answer.model, images=[pasted], png=[png_with_parameters(pasted, parameters)],
                            parameters=parameters, seconds=answer.seconds)


def _min_overlap(layout: TileLayout) -> int:
    gaps = [b - a for a, b in zip(layout.xs, layout.xs[1:])] + [b - a for a, b in zip(layout.ys, layout.ys[1:])]
    sides = [layout.tile_size[0]] * (len(layout.xs) - 1) + [layout.tile_size[1]] * (len(layout.ys) - 1)
    return min((side - gap for side, gap in zip(sides, gaps)), default=0)


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
