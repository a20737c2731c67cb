"""Generation parameters inside a PNG, as a text chunk: written on every result, read back on drop.

The endpoint already writes the chunk (key "parameters", JSON) into every image it returns;
the studio makes sure it is there, so that a download always carries what made it.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

PARAMETERS_KEY = "parameters"


def read_parameters(png: bytes) -> dict[str, Any] | None:
    """The parameters embedded in a PNG, or None for any other file."""
    try:
        with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
            text = image.text.get(PARAMETERS_KEY)  # reads the text chunks, not the pixels
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if not text:
        return None
    try:
        parameters = json.loads(text)
    except ValueError:
        return None
    return parameters if isinstance(parameters, dict) else None


def embed_parameters(png: bytes, parameters: dict[str, Any]) -> bytes:
    """The PNG with `parameters` in its text chunk; unchanged bytes when they are already there."""
    if read_parameters(png) == parameters:
        return png
    with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
        info = PngImagePlugin.PngInfo()
        for key, value in image.text.items():
            if key != PARAMETERS_KEY:
                info.add_text(key, value)
        info.add_text(PARAMETERS_KEY, json.dumps(parameters))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
