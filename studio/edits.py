"""Edits that touch only what they should: Erase (inpaint what was painted) and Extend (outpaint
new borders), both with the inpainting model, both done on the studio's side of the endpoint.

The endpoint repaints what it is sent, and everything it is sent goes through the VAE, which
shifts every pixel a little. So the studio sends only what must change, and puts the answer back
itself:

1. the mask: for Erase, what was painted, grown or shrunk (`mask_grow`) and blurred
   (`mask_feather`); for Extend, the new borders plus a strip of the old image (`extend_overlap`)
   fading out into it. Its values say how much of the new pixels each pixel takes (`alpha`);
2. the box sent: with `only_masked` (Extend always), a box around the mask with `mask_padding`
   px of context, resized to `work_side` (by default the model's working size,
   ModelSpec.working_side: a small area gets the model's full resolution, an image larger than the
   model's working size still fits);
   otherwise the whole image at its own size, as the endpoint takes it;
3. the answer is resized back to the box and composited over the input with `alpha`: every pixel
   whose alpha is 0 is the input's own, byte for byte.

`plan_edit` does 1-2 without sending anything (studio.planning calls it; studio.runner calls
`EditPlan.paste` on each answer). The settings are studio-side arguments, declared here once
with their type, range and help like the model table's (`params.Argument`), and checked with the
model's arguments (studio.tasks.Task.check): the tabs show them as controls, the API and the
client take them, and every result's parameters carry them, so "restore" brings them back.
Everything here is a plain function of images; no Gradio, no network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sdserve.catalog import MASK_THRESHOLD, MIN_IMAGE_SIDE, MODELS, MODELS_BY_TASK, SIZE_MULTIPLE, ModelSpec
from sdserve.params import Argument

from studio.errors import StudioError

# Both edits repaint with the model of the Erase task.
INPAINTING = MODELS_BY_TASK["erase"]

# --- the settings ------------------------------------------------------------------------------

MASK_GROW = Argument(
    "mask_grow", int, 0, "Grow mask (px)",
    "Widens what was painted by this many pixels before it is sent; negative narrows it.",
    minimum=-64, maximum=64, step=1, pipeline=False,
)
MASK_FEATHER = Argument(
    "mask_feather", int, 8, "Feather (px)",
    "Blur radius of the mask's edge, so the new content fades into the old; pixels the blurred mask "
    "does not reach stay exactly as they were.",
    minimum=0, maximum=64, step=1, pipeline=False,
)
MASK_PADDING = Argument(
    "mask_padding", int, 32, "Context (px)",
    "How much of the image around the edited area is sent with it, for the model to match.",
    minimum=0, maximum=256, step=8, pipeline=False,
)
WORK_SIDE = Argument(
    "work_side", int, INPAINTING.working_side, "Work size (px)",
    "The longer side the box around the edit is sent at: the model's working size by default; "
    "larger is sharper and slower.",
    minimum=64, maximum=INPAINTING.max_image_side, step=8, multiple_of=SIZE_MULTIPLE, pipeline=False,
)
ONLY_MASKED = Argument(
    "only_masked", bool, True, "Only the masked area, at full resolution",
    "Send a box around the mask, enlarged to the model's working size, and paste the result back. "
    "Off: the whole image at its own size (the result is still pasted back through the mask).",
    widget="checkbox", pipeline=False,
)
EXTEND_SIDES = ("left", "right", "top", "bottom")
# px added on one side at most: the model's working side, one call's worth of new canvas.
EXTEND_LIMIT = INPAINTING.working_side
EXTEND_ARGUMENTS = tuple(
    Argument(
        f"extend_{side}", int, 0, f"{side.capitalize()} (px)", f"New canvas added on the {side}.",
        minimum=0, maximum=EXTEND_LIMIT, step=8, pipeline=False,
    )
    for side in EXTEND_SIDES
)
EXTEND_OVERLAP = Argument(
    "extend_overlap", int, 32, "Overlap (px)",
    "How far the new content reaches into the old image, fading out there; the rest of the old image "
    "stays exactly as it was.",
    minimum=0, maximum=128, step=8, pipeline=False,
)

# How the preview shows what will be sent: the mask tinted over the image, the box outlined.
PREVIEW_TINT = (255, 0, 255)
PREVIEW_TINT_OPACITY = 0.6
PREVIEW_BOX_RGB = (0, 200, 255)


@dataclass(frozen=True)
class EditTool:
    """A studio tab and API endpoint that edits with a model through a mask made on the studio side."""

    name: str  # the tab, its API endpoint, and the "task" of its results
    model: str  # the Triton model it sends to
    title: str
    summary: str
    settings: tuple[Argument, ...]
    settings_title: str  # the group its settings are shown in
    takes_mask: bool  # painted by the designer (Erase); Extend makes its own

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    def defaults(self) -> dict[str, Any]:
        return {argument.name: argument.default for argument in self.settings}


ERASE = EditTool(
    "erase", INPAINTING.name, "Erase", INPAINTING.summary,
    (MASK_GROW, MASK_FEATHER, MASK_PADDING, ONLY_MASKED, WORK_SIDE), "Mask", takes_mask=True,
)
EXTEND = EditTool(
    "extend", INPAINTING.name, "Extend",
    "More canvas on the sides you choose; the model fills it in to match (outpainting).",
    (*EXTEND_ARGUMENTS, EXTEND_OVERLAP, MASK_PADDING, WORK_SIDE), "Canvas", takes_mask=False,
)
EDIT_TOOLS: dict[str, EditTool] = {tool.name: tool for tool in (ERASE, EXTEND)}


# --- masks -------------------------------------------------------------------------------------


def grown(mask: Image.Image, pixels: int) -> Image.Image:
    """A hard mask (255 where mask >= MASK_THRESHOLD) grown by `pixels`, or shrunk when negative.

    Steps of one pixel alternate a cross and a square neighbourhood: an octagon, close to a circle,
    in |pixels| passes over the array. Shrinking grows the kept part; the image's border does not
    count as kept, so a mask touching the border stays at the border.
    """
    painted = np.asarray(mask.convert("L")) >= MASK_THRESHOLD
    if pixels < 0:
        painted = ~_dilated(~painted, -pixels)
    elif pixels > 0:
        painted = _dilated(painted, pixels)
    return Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")


def _dilated(cells: np.ndarray, steps: int) -> np.ndarray:
    for step in range(steps):
        out = cells.copy()
        out[1:] |= cells[:-1]
        out[:-1] |= cells[1:]
        out[:, 1:] |= cells[:, :-1]
        out[:, :-1] |= cells[:, 1:]
        if step % 2:
            out[1:, 1:] |= cells[:-1, :-1]
            out[1:, :-1] |= cells[:-1, 1:]
            out[:-1, 1:] |= cells[1:, :-1]
            out[:-1, :-1] |= cells[1:, 1:]
        cells = out
    return cells


def feathered_mask(mask: Image.Image, grow: int = 0, feather: int = 0) -> Image.Image:
    """Erase's alpha: the painted mask grown by `grow` px, its edge blurred with radius `feather`."""
    hard = grown(mask, grow)
    return hard.filter(ImageFilter.GaussianBlur(feather)) if feather > 0 else hard


def extended_canvas(image: Image.Image, sides: Mapping[str, int]) -> Image.Image:
    """The image on a larger canvas, its edge pixels repeated into the new borders: a neutral start
    for the model (it replaces the borders entirely at strength 1, and blends better from them below)."""
    pixels = np.asarray(image.convert("RGB"))
    padded = np.pad(pixels, ((sides["top"], sides["bottom"]), (sides["left"], sides["right"]), (0, 0)), mode="edge")
    return Image.fromarray(padded, "RGB")


def extension_mask(size: tuple[int, int], sides: Mapping[str, int], overlap: int) -> Image.Image:
    """Extend's alpha on the extended canvas: 255 on the new borders, fading linearly to 0 across
    `overlap` px of the old image, and 0 beyond (those pixels stay the old image's own)."""
    width, height = size
    old_left, old_top = sides["left"], sides["top"]
    old_right, old_bottom = width - sides["right"], height - sides["bottom"]
    centres_x, centres_y = np.arange(width) + 0.5, np.arange(height) + 0.5
    # Distance inside the old image from each extended side (negative: on the new border).
    depths = []
    if sides["left"]:
        depths.append(np.broadcast_to(centres_x[None, :] - old_left, (height, width)))
    if sides["right"]:
        depths.append(np.broadcast_to(old_right - centres_x[None, :], (height, width)))
    if sides["top"]:
        depths.append(np.broadcast_to(centres_y[:, None] - old_top, (height, width)))
    if sides["bottom"]:
        depths.append(np.broadcast_to(old_bottom - centres_y[:, None], (height, width)))
    depth = np.minimum.reduce(depths)
    alpha = np.where(depth < 0, 1.0, 0.0) if overlap == 0 else np.clip(1 - depth / overlap, 0.0, 1.0)
    return Image.fromarray(np.rint(alpha * 255).astype(np.uint8), "L")


# --- the box sent --------------------------------------------------------------------------------


def padded_box(alpha: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """The box around every pixel the alpha touches, `padding` px wider on each side, within the image."""
    left, top, right, bottom = alpha.getbbox()
    width, height = alpha.size
    return max(0, left - padding), max(0, top - padding), min(width, right + padding), min(height, bottom + padding)


def working_size(box_size: tuple[int, int], working_side: int, max_side: int) -> tuple[int, int]:
    """The size a box is sent at: its longer side at `working_side`, in multiples of 8, the shorter one
    at least MIN_IMAGE_SIDE and neither above `max_side` (a very long thin box keeps its shape)."""
    width, height = box_size
    scale = working_side / max(width, height)
    scale = max(scale, MIN_IMAGE_SIDE / min(width, height))
    scale = min(scale, max_side / max(width, height))

    def snapped(side: int) -> int:
        return min(max_side, max(MIN_IMAGE_SIDE, round(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE))

    return snapped(width), snapped(height)


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditPlan:
    """What an edit sends (`call_image`, `call_mask`) and how its answers are put back (`paste`)."""

    tool: str
    canvas: Image.Image  # what the answer is pasted on: the input (Erase) or the extended input (Extend)
    alpha: Image.Image  # L, canvas-sized: how much of the new pixels each pixel takes
    box: tuple[int, int, int, int]  # the part of the canvas sent
    sent_size: tuple[int, int]  # the size it is sent at
    settings: dict[str, Any]  # the studio-side settings, as the results' parameters carry them

    @property
    def call_image(self) -> Image.Image:
        return self.canvas.crop(self.box).resize(self.sent_size, Image.Resampling.LANCZOS)

    @property
    def call_mask(self) -> Image.Image:
        """White wherever the alpha is above 0, so the model repaints every pixel that takes any of it.
        Resized with BILINEAR and then made hard at any grey, it never loses a thin stroke."""
        hard = self.alpha.crop(self.box).point(lambda value: 255 if value else 0)
        return hard.resize(self.sent_size, Image.Resampling.BILINEAR).point(lambda value: 255 if value else 0)

    def paste(self, generated: Image.Image) -> Image.Image:
        """The answer resized back to the box and composited over the canvas through the alpha."""
        left, top, right, bottom = self.box
        patch = generated.convert("RGB").resize((right - left, bottom - top), Image.Resampling.LANCZOS)
        blended = Image.composite(patch, self.canvas.crop(self.box), self.alpha.crop(self.box))
        result = self.canvas.copy()
        result.paste(blended, (left, top))
        return result

    def parameters(self, answered: Mapping[str, Any]) -> dict[str, Any]:
        """A pasted result's parameters: the endpoint's for the box, with the result's size, the settings
        (restored into the tab from there) and where the box was."""
        width, height = self.canvas.size
        return {
            **answered, "task": self.tool, **self.settings, "width": width, "height": height,
            "edit_box": list(self.box), "edit_sent_size": list(self.sent_size),
        }

    def preview(self) -> Image.Image:
        """The canvas with the alpha tinted over it and the box sent outlined: what the designer checks."""
        tint = Image.new("RGB", self.canvas.size, PREVIEW_TINT)
        opacity = self.alpha.point(lambda value: round(value * PREVIEW_TINT_OPACITY))
        shown = Image.composite(tint, self.canvas, opacity)
        outline = max(1, max(self.canvas.size) // 256)
        left, top, right, bottom = self.box
        ImageDraw.Draw(shown).rectangle((left, top, right - 1, bottom - 1), outline=PREVIEW_BOX_RGB, width=outline)
        return shown


def plan_edit(tool: EditTool, image: Image.Image, mask: Image.Image | None, settings: Mapping[str, Any],
              max_side: int) -> EditPlan:
    """The edit's plan for inputs already checked (studio.tasks.Task.check: the image within the
    tab's limits, a painted mask where the tool takes one, every setting); StudioError when there is
    nothing to edit or the result would be over `max_side` px a side."""
    settings = dict(settings)
    image = image.convert("RGB")
    if tool.takes_mask:
        canvas, alpha = image, feathered_mask(mask, settings["mask_grow"], settings["mask_feather"])
        if alpha.getbbox() is None:
            raise StudioError(f"The mask is empty after shrinking it by {-settings['mask_grow']} px: "
                              "shrink it less or paint more.")
        whole = not settings["only_masked"]
    else:
        sides = {side: settings[f"extend_{side}"] for side in EXTEND_SIDES}
        if not any(sides.values()):
            raise StudioError("Choose how many pixels to add on at least one side.")
        width, height = image.width + sides["left"] + sides["right"], image.height + sides["top"] + sides["bottom"]
        if max(width, height) > max_side:
            raise StudioError(f"The extended image would be {width}×{height} px; {tool.title} makes at most "
                              f"{max_side} px a side. Add less, or make the image smaller first.")
        canvas = extended_canvas(image, sides)
        alpha = extension_mask(canvas.size, sides, settings["extend_overlap"])
        whole = False
    if whole:
        box = (0, 0, *canvas.size)
        # The endpoint works in multiples of 8 (it would resize down itself): sent at that size.
        sent = tuple(side - side % SIZE_MULTIPLE for side in canvas.size)
    else:
        box = padded_box(alpha, settings["mask_padding"])
        sent = working_size((box[2] - box[0], box[3] - box[1]), settings["work_side"], tool.spec.max_image_side)
    return EditPlan(tool.name, canvas, alpha, box, sent, settings)
