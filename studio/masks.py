"""The Erase tab's mask: made from the image editor's painted layers, and put back into one.

The editor hands over its background and one RGBA layer per paint layer. Whatever the brush
touched (any alpha) is to be replaced: white in the mask; everything else is kept: black.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from PIL import Image, ImageChops

# The brush paints in this colour so the strokes stand out on most images.
BRUSH_RGB = (255, 0, 255)
BRUSH_OPACITY = 0.6


def mask_from_layers(layers: Iterable[Image.Image | None], size: tuple[int, int]) -> Image.Image:
    """White where any layer was painted, black elsewhere, at `size` (the image's size)."""
    mask = Image.new("L", size, 0)
    for layer in layers:
        if layer is None:
            continue
        painted = layer.convert("RGBA").getchannel("A").point(lambda alpha: 255 if alpha else 0)
        if painted.size != size:
            # NEAREST keeps the mask hard-edged: no grey pixels the endpoint would have to guess about.
            painted = painted.resize(size, Image.Resampling.NEAREST)
        mask = ImageChops.lighter(mask, painted)
    return mask


def mask_from_editor(value: Mapping[str, Any] | None) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) from a gr.ImageEditor value with type="pil"; (None, None) when it has no image."""
    background = (value or {}).get("background")
    if background is None:
        return None, None
    image = background.convert("RGB")
    return image, mask_from_layers(value.get("layers") or [], image.size)


def brush_layer(mask: Image.Image) -> Image.Image:
    """A mask as the editor shows a painted layer: brush colour where white, transparent elsewhere."""
    alpha = mask.convert("L").point(lambda value: round(255 * BRUSH_OPACITY) if value >= 128 else 0)
    layer = Image.new("RGBA", mask.size, (*BRUSH_RGB, 0))
    layer.putalpha(alpha)
    return layer


def editor_value(image: Image.Image | None, mask: Image.Image | None = None) -> dict[str, Any]:
    """A gr.ImageEditor value showing `image`, with `mask` painted on it when given.

    No composite: the editor makes its own, and one given here is shown in place of the image.
    """
    layers = [brush_layer(mask)] if image is not None and mask is not None else []
    return {"background": image, "layers": layers, "composite": None}
