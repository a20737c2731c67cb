"""A typed, validated request per model, built from the raw KServe v2 BYTES inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image

from .catalog import MASK_THRESHOLD, MAX_PROMPT_CHARS, MIN_IMAGE_SIDE, MODELS, SIZE_MULTIPLE, ModelSpec
from .errors import RequestError
from .images import decode_image


@dataclass
class GenerationRequest:
    """One row of a request: everything a pipeline call needs for it, already checked."""

    model: str
    prompt: str
    negative_prompt: str
    args: dict[str, Any]  # validated gen_args, defaults filled in
    image: Image.Image | None = None
    mask_image: Image.Image | None = None

    @property
    def steps(self) -> int:
        """The denoising steps its pipeline call runs (ModelSpec.denoising_steps)."""
        return self.spec.denoising_steps(self.args)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the pipeline works at."""
        if self.image is not None:
            return self.image.size
        return self.args["width"], self.args["height"]

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call.

        Everything the pipeline takes as one scalar for the whole batch goes in; what it
        takes per item (prompts, images, seeds) stays out.
        """
        shared = tuple((argument.name, self.args[argument.name]) for argument in self.spec.arguments if argument.shared_by_batch)
        return (self.model, self.size, shared)

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]


def parse_request(model: str, fields: Mapping[str, bytes | None]) -> GenerationRequest:
    """Validate one row of raw inputs (None for an input that was not sent)."""
    spec = MODELS[model]
    prompt = _text(fields.get("prompt"), "prompt")
    if spec.prompt_required and not prompt.strip():
        raise RequestError("prompt", f"must not be empty for {model}")
    request = GenerationRequest(
        model=model,
        prompt=prompt,
        negative_prompt=_text(fields.get("negative_prompt"), "negative_prompt"),
        args=spec.parse_gen_args(fields.get("gen_args")),
    )
    if spec.takes_image:
        image = _checked_image(spec, fields.get("image"))
        if spec.takes_mask:
            request.mask_image = _snap(_mask(fields.get("mask_image"), image.size), Image.Resampling.NEAREST)
        request.image = _snap(image, Image.Resampling.LANCZOS)
    return request


def _text(raw: bytes | None, field: str) -> str:
    if raw is None:
        return ""
    if len(raw) > MAX_PROMPT_CHARS * 4:  # UTF-8 takes at most 4 bytes a character
        raise RequestError(field, f"is over the {MAX_PROMPT_CHARS} character limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(field, "is not valid UTF-8 text") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(field, f"is over the {MAX_PROMPT_CHARS} character limit")
    return text


def _checked_image(spec: ModelSpec, raw: bytes | None) -> Image.Image:
    model = spec.name
    if not raw:
        raise RequestError("image", f"is required for {model}")
    image = decode_image(raw, "image")
    width, height = image.size
    limit = spec.max_image_side
    if max(width, height) > limit:
        raise RequestError(
            "image", f"is {width}x{height}; {model} accepts at most {limit} px a side"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise RequestError(
            "image", f"is {width}x{height}; {model} needs at least {MIN_IMAGE_SIDE} px a side"
        )
    return image


def _mask(raw: bytes | None, image_size: tuple[int, int]) -> Image.Image:
    """The inpainting mask: white = replace, black = keep.

    A mask of another size than the image is refused rather than stretched: a stretched
    mask erases somewhere the designer did not paint.
    """
    if not raw:
        raise RequestError("mask_image", "is required (white = replace, black = keep)")
    mask = decode_image(raw, "mask_image", mode="L")
    if mask.size != image_size:
        raise RequestError(
            "mask_image",
            f"is {mask.size[0]}x{mask.size[1]} but the image is {image_size[0]}x{image_size[1]}; "
            "they must be the same size",
        )
    if mask.getextrema()[1] < MASK_THRESHOLD:
        raise RequestError("mask_image", "is empty: paint the area to replace in white")
    return mask


def _snap(image: Image.Image, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    snapped = (width - width % SIZE_MULTIPLE, height - height % SIZE_MULTIPLE)
    return image if snapped == image.size else image.resize(snapped, resample)
