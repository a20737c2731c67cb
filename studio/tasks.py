"""The studio's four tasks as data: the model each one calls, its controls and their limits.

Ranges and defaults mirror the serving side's allow-list (serving/sdserve/params.py, whose
defaults follow the reference article) and its image limits (serving/sdserve/request.py). They
are copied, not imported, because the studio runs without the serving package (its Docker image
has none); tests/test_studio_logic.py checks that the copies agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from studio.client import GenerationResult, StatusCallback, StudioClient, StudioError

RANDOM_SEED = -1
SEED_MAX = 2**32 - 1
SCHEDULERS = ("default", "ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "pndm")
MIN_IMAGE_SIDE = 32
MASK_THRESHOLD = 128  # the endpoint reads mask pixels at or above this as "replace"


@dataclass(frozen=True)
class Control:
    """One argument of a task as the studio shows it: a text box, a slider, a list or a number."""

    name: str  # the StudioClient keyword argument
    label: str
    widget: str  # "text", "slider", "dropdown" or "number"
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    parameter: str | None = None  # its key in the endpoint's `parameters`, when that differs
    info: str | None = None

    @property
    def parameter_key(self) -> str:
        return self.parameter or self.name

    def validate(self, value: Any) -> Any:
        """`value` as the endpoint wants it, or a StudioError naming the control and its limits.

        Sliders and number boxes hand over floats (50.0), which the endpoint refuses for an
        integer argument, so numbers are converted to the control's type first; an emptied
        field (None) means the default.
        """
        kind = type(self.default)
        if value is None:  # an emptied field
            return self.default
        if kind is str:
            value = str(value)
            if self.choices and value not in self.choices:
                raise StudioError(f"{self.label} must be one of {', '.join(self.choices)}; got {value!r}.")
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise StudioError(f"{self.label} must be a number; got {value!r}.") from None
        if number != number or number in (float("inf"), float("-inf")):  # NaN or infinite
            raise StudioError(f"{self.label} must be a finite number; got {value!r}.")
        number = int(round(number)) if kind is int else number
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise StudioError(f"{self.label} must be from {kind(self.minimum)} to {kind(self.maximum)}; got {value}.")
        return number

    def restore(self, value: Any) -> Any:
        """A value read back from a PNG or the browser's storage: the default where it is unusable."""
        try:
            return self.validate(value)
        except StudioError:
            return self.default


@dataclass(frozen=True)
class Task:
    """One tab of the studio and one API endpoint: `name` is both, and the StudioClient method."""

    name: str
    title: str
    model: str
    summary: str
    controls: tuple[Control, ...]
    takes_image: bool = False
    takes_mask: bool = False
    prompt_required: bool = False
    max_image_side: int | None = None

    def defaults(self) -> dict[str, Any]:
        return {control.name: control.default for control in self.controls}

    def run(
        self,
        client: StudioClient,
        values: dict[str, Any],
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        on_status: StatusCallback | None = None,
    ) -> GenerationResult:
        """Check the inputs, then call the model through the client layer."""
        arguments = {control.name: control.validate(values.get(control.name, control.default)) for control in self.controls}
        if self.prompt_required and not arguments["prompt"].strip():
            raise StudioError(f"Write a prompt: {self.title} needs one.")
        images = []
        if self.takes_image:
            images.append(self.checked_image(image))
        if self.takes_mask:
            images.append(checked_mask(mask, images[0].size))
        return getattr(client, self.name)(*images, on_status=on_status, **arguments)

    def checked_image(self, image: Image.Image | None) -> Image.Image:
        if image is None:
            raise StudioError(f"{self.title} needs an input image: upload one, or send a result here from another tab.")
        width, height = image.size
        if self.max_image_side and max(width, height) > self.max_image_side:
            raise StudioError(
                f"The image is {width}×{height} px; {self.title} accepts at most {self.max_image_side} px a side. "
                "Make it smaller first."
            )
        if min(width, height) < MIN_IMAGE_SIDE:
            raise StudioError(f"The image is {width}×{height} px; {self.title} needs at least {MIN_IMAGE_SIDE} px a side.")
        return image.convert("RGB")


def checked_mask(mask: Image.Image | None, image_size: tuple[int, int]) -> Image.Image:
    """The mask as the endpoint takes it (white = replace), or a StudioError saying what is wrong."""
    if mask is None:
        raise StudioError("The mask is empty: paint over the area to replace.")
    mask = mask.convert("L")
    if mask.size != image_size:
        raise StudioError(
            f"The mask is {mask.size[0]}×{mask.size[1]} px but the image is {image_size[0]}×{image_size[1]} px; "
            "they must be the same size."
        )
    if mask.getextrema()[1] < MASK_THRESHOLD:
        raise StudioError("The mask is empty: paint over the area to replace.")
    return mask


# --- the controls ---------------------------------------------------------------------------


def _prompt(label: str, info: str | None = None) -> Control:
    return Control("prompt", label, "text", "", info=info)


def _common(guidance: float) -> tuple[Control, ...]:
    """The arguments every model takes, with the serving side's ranges."""
    return (
        Control("negative_prompt", "Negative prompt", "text", "", info="What to steer away from."),
        Control("steps", "Steps", "slider", 50, 1, 150, 1, parameter="num_inference_steps"),
        Control("guidance_scale", "Guidance", "slider", guidance, 0.0, 30.0, 0.5, info="How closely to follow the prompt."),
        Control("scheduler", "Scheduler", "dropdown", "default", choices=SCHEDULERS),
        Control(
            "seed", "Seed", "number", RANDOM_SEED, RANDOM_SEED, SEED_MAX, 1,
            info="-1 picks a random seed; the one used is shown with the result.",
        ),
        Control("num_images", "Images", "slider", 1, 1, 4, 1, parameter="num_images_per_prompt"),
    )


def _size(name: str, label: str) -> Control:
    return Control(name, label, "slider", 512, 64, 1024, 8)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="generate",
            title="Generate",
            model="sd_base",
            summary="Text to image with Stable Diffusion 2.1 base.",
            controls=(_prompt("Prompt"), *_common(7.5), _size("width", "Width"), _size("height", "Height")),
            prompt_required=True,
        ),
        Task(
            name="restyle",
            title="Restyle",
            model="sd_depth",
            summary="A new look for an image that keeps its shapes and depth (depth-to-image).",
            controls=(
                _prompt("Prompt", "The new look."),
                *_common(7.5),
                Control("strength", "Strength", "slider", 0.8, 0.0, 1.0, 0.05, info="How far to move from the input."),
            ),
            takes_image=True,
            prompt_required=True,
            max_image_side=1024,
        ),
        Task(
            name="erase",
            title="Erase",
            model="sd_inpaint",
            summary="Paint over what should go; the model fills it in (inpainting).",
            controls=(
                _prompt("What should replace it", "Leave empty to blend in with the surroundings."),
                *_common(7.5),
                Control("strength", "Strength", "slider", 1.0, 0.0, 1.0, 0.05),
            ),
            takes_image=True,
            takes_mask=True,
            max_image_side=1024,
        ),
        Task(
            name="upscale",
            title="Upscale",
            model="sd_upscale",
            summary="Four times the width and height; a prompt describing the image guides the detail.",
            controls=(
                _prompt("Prompt", "Describe the image."),
                *_common(9.0),
                Control("noise_level", "Noise level", "slider", 20, 0, 350, 1, info="More noise, more invented detail."),
            ),
            takes_image=True,
            max_image_side=512,
        ),
    )
}

TASK_BY_MODEL: dict[str, Task] = {task.model: task for task in TASKS.values()}
