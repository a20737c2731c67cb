"""A job planned before anything is sent: the InvokeEndpoint calls it takes, and why.

SageMaker caps one InvokeEndpoint answer (like the request) at MAX_PAYLOAD_BYTES (6,291,456
bytes) and one invocation at 60 s. So a job that cannot fit one call is split:

* several images (`num_images_per_prompt` N > 1) into N calls of one image each, seeds s, s+1,
  ... (a seed of -1 is made a random seed here first, so the job's seeds are consecutive as the
  server makes them); each image is reported as soon as its call answers;
* an input whose model has a tiling (ModelSpec.tiling: the x4 upscaler) and is larger than one
  tile into overlapping tiles (studio.tiles), every tile with the job's seed, stitched in output
  space with feathered seams. An image that fits one tile is sent as one call, untouched, and
  its result is the endpoint's own, byte for byte.

Erase and Extend (studio.edits) are one call per image too: what is sent is the box around
their mask at its work size, and each answer is pasted back into the input through the mask
before it is reported (`JobPlan.edit`).

    plan = plan_job(task.check(values, image, mask))
        Pure (no network), on inputs already checked: resolves seed -1, cuts tiles and says how
        many calls the job takes and why, naming the limit: `plan.call_count`, `plan.seeds`,
        `plan.summary` ("Upscale: sent as 9 calls at once. The 512×512 px image becomes
        2048×2048 px; one answer from the endpoint may carry at most 6 MB ..."), and what the job
        costs, `plan.work` (below), what the studio's quotas charge (studio.quotas).

A job's work is what its calls make the endpoint do: for each call, its rows (images) x the
denoising steps it really runs x the megapixels of its output; one unit is one step over one
megapixel (WORK_UNIT). It is counted from the calls as planned, so a 1024 px upscale of 4 images
(100 calls of 1024×1024 px output tiles) costs what its 100 calls cost, not 4 images; an
image-to-image model runs int(steps x strength) steps (ModelSpec.strength_scales_steps); the
time of a step grows with its megapixels (sdserve.budget fits it so).

studio.runner sends a plan's calls and puts the answers together.
"""

from __future__ import annotations

from dataclasses import dataclass
from random import Random
from typing import Any

from PIL import Image
from sdserve.budget import megapixels
from sdserve.catalog import (
    IMAGE,
    INVOCATION_SECONDS,
    MASK_IMAGE,
    MAX_PAYLOAD_BYTES,
    MIN_IMAGE_SIDE,
    NEGATIVE_PROMPT,
    PROMPT,
    SIZE_MULTIPLE,
    ModelSpec,
)
from sdserve.params import SEED_MAX, image_seeds, random_seed
from sdserve.wire import worst_case_answer_bytes

from studio.edits import EditPlan, plan_edit
from studio.tasks import JobInputs
from studio.tiles import TileLayout, cut_tiles

# What a job's work is counted in: one denoising step over one megapixel (10^6 px, as
# sdserve.budget counts) of output. A 512×512 Generate at the default 50 steps is about 13.
WORK_UNIT = "units of work"
WORK_UNIT_MEANING = "one unit is one denoising step over one megapixel of output"


@dataclass(frozen=True)
class PlannedCall:
    """One InvokeEndpoint call of a job: exactly what is sent, and what it is part of."""

    index: int  # position in JobPlan.calls
    image_index: int  # which image of the job it makes, or makes a tile of
    tile_index: int | None  # its tile in JobPlan.layout.boxes; None when not tiled
    label: str  # "image 2 of 4", "tile 3 of 9", "image 2 of 4, tile 3 of 9", or "the call"
    inputs: dict[str, str | Image.Image]
    gen_args: dict[str, Any]
    work: float  # rows x steps run x output megapixels (WORK_UNIT); call_work

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
    def work(self) -> float:
        """What the job makes the endpoint do, in WORK_UNIT: its calls' work together."""
        return sum(call.work for call in self.calls)

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


def _megabytes(size: int) -> str:
    return f"{size / 2**20:g} MB"


def describe_work(units: float) -> str:
    """An amount of work as a designer reads it: "5,243 units of work", "0.41 units of work"."""
    number = f"{units:,.0f}" if units >= 10 else f"{units:.2g}"
    return f"1 {WORK_UNIT.replace('units', 'unit')}" if number == "1" else f"{number} {WORK_UNIT}"


def call_work(spec: ModelSpec, image: Image.Image | None, gen_args: dict[str, Any]) -> float:
    """One call's work (WORK_UNIT): its rows x the steps it runs x its output megapixels.

    `image` is the image the call sends (a tile, an edit's box), None for a model that takes
    none (its size is then the width and height arguments); the server works on it cut down to
    multiples of SIZE_MULTIPLE, and its output is that times the model's output_scale.
    """
    args = {**spec.defaults(), **gen_args}
    if image is not None:
        width, height = (side - side % SIZE_MULTIPLE for side in image.size)
    else:
        width, height = args["width"], args["height"]
    output = (width * spec.output_scale, height * spec.output_scale)
    return spec.denoising_steps(args) * megapixels(output, args["num_images_per_prompt"])


def plan_job(inputs: JobInputs, *, tile_side: int | None = None, tile_overlap: int | None = None,
             rng: Random | None = None) -> JobPlan:
    """The calls of a job whose inputs were checked (studio.tasks.Task.check), sending nothing.

    `tile_side`/`tile_overlap` (input px) replace the model's tiling (ModelSpec.tiling), for tests
    and tuning; a tile side whose worst-case answer exceeds MAX_PAYLOAD_BYTES is a ValueError.
    `rng` picks the seed for -1 (default: the secrets module, as the server does).
    """
    task, spec = inputs.task, inputs.task.spec
    gen_args, image = inputs.gen_args, inputs.image
    count = gen_args.get("num_images_per_prompt", spec.argument("num_images_per_prompt").default)
    pick_seed = (lambda: rng.randint(0, SEED_MAX)) if rng is not None else random_seed
    # Each image's seeds, counted exactly as sdserve.batch does for one call (-1 resolved once, here).
    each_image = image_seeds({**gen_args, "num_images_per_prompt": count}, pick_seed)
    seeds = tuple(image_seed["seed"] for image_seed in each_image)
    variation_seeds = tuple(image_seed["variation_seed"] for image_seed in each_image if "variation_seed" in image_seed)

    sent: dict[str, str | Image.Image] = {PROMPT: inputs.prompt, NEGATIVE_PROMPT: inputs.negative_prompt}
    if spec.takes_image:
        sent[IMAGE] = image
    if spec.takes_mask:
        sent[MASK_IMAGE] = inputs.mask
    edit = None
    if task.tool is not None:
        edit = plan_edit(task.tool, image, inputs.mask, inputs.settings, task.max_image_side)
        sent[IMAGE], sent[MASK_IMAGE] = edit.call_image, edit.call_mask

    layout, tiles, reasons = None, [], []
    if spec.tiling is not None:
        side = tile_side or spec.tiling.side
        overlap = spec.tiling.overlap if tile_overlap is None else tile_overlap
        _check_tile(side, overlap, spec.output_scale)
        width, height = image.size
        # Sides as the server will use them (it resizes down to multiples of 8): an image that
        # fits one tile then is sent as one call, untouched.
        if max(width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE) > side:
            layout, tiles = cut_tiles(image, side, overlap, spec.output_scale)
            out_width, out_height = layout.output_size
            tile_out = side * spec.output_scale
            reasons.append(
                f"The {width}×{height} px image becomes {out_width}×{out_height} px; one answer from the endpoint "
                f"may carry at most {_megabytes(MAX_PAYLOAD_BYTES)} and only {tile_out}×{tile_out} px is sure to "
                f"fit, so it is upscaled in {layout.count} overlapping tiles of "
                f"{layout.tile_size[0]}×{layout.tile_size[1]} px "
                f"({len(layout.xs)}×{len(layout.ys)}), blended where they overlap."
            )
    if count > 1:
        calls_of = "its own calls" if layout is not None else "its own call"
        numbered = (f"seed {seeds[0]}, variation seeds {variation_seeds[0]} to {variation_seeds[-1]}"
                    if variation_seeds else f"seeds {seeds[0]} to {seeds[-1]}")
        reasons.append(
            f"Each of the {count} images ({numbered}) is {calls_of}, so every answer stays "
            f"within the endpoint's {_megabytes(MAX_PAYLOAD_BYTES)} answer limit, every call does one image's "
            f"work (SageMaker allows a call {INVOCATION_SECONDS} s), and each image shows when it is ready."
        )

    calls: list[PlannedCall] = []
    for image_index, image_seed in enumerate(each_image):
        image_label = f"image {image_index + 1} of {count}" if count > 1 else ""
        if layout is None:
            # One image: sent as the caller gave it, only the seeds resolved (the same request as unsplit).
            args = {**gen_args, **image_seed} if count == 1 else {**gen_args, **image_seed, "num_images_per_prompt": 1}
            calls.append(PlannedCall(len(calls), image_index, None, image_label or "the call", sent, args,
                                     call_work(spec, sent.get(IMAGE), args)))
            continue
        args = {**gen_args, **image_seed, "num_images_per_prompt": 1}  # every tile: its image's seeds
        for tile_index, tile in enumerate(tiles):
            label = ", ".join(filter(None, (image_label, f"tile {tile_index + 1} of {layout.count}")))
            calls.append(PlannedCall(len(calls), image_index, tile_index, label, {**sent, IMAGE: tile}, args,
                                     call_work(spec, tile, args)))
    return JobPlan(task.name, spec.name, task.title, seeds, tuple(calls), layout, tuple(reasons), edit,
                   variation_seeds)


def _check_tile(side: int, overlap: int, scale: int) -> None:
    """A ValueError for a tiling no call could take, or whose worst-case answer would not fit."""
    if side % SIZE_MULTIPLE or side < MIN_IMAGE_SIDE or not 0 <= overlap < side:
        raise ValueError(f"tile side {side} / overlap {overlap}: the side must be a multiple of "
                         f"{SIZE_MULTIPLE} from {MIN_IMAGE_SIDE}, the overlap from 0 to less than the side")
    if worst_case_answer_bytes(side * scale, side * scale) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"a {side} px tile's answer ({side * scale} px) can exceed {MAX_PAYLOAD_BYTES} bytes")
