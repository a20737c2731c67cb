"""Small sample inputs the tests build in memory."""

import base64
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin


def png_b64(size=(64, 64), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())


def mask_b64(size=(64, 64), box=(16, 16, 48, 48)) -> bytes:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())


def bomb_png_b64(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return base64.b64encode(png)


# The project's determinism guarantee (docs/endpoint.md, "Determinism"): the same seed and parameters give
# the same image within one level of 255 in every pixel, alone or at any position in a batch, on
# any x86-64 CPU. Bit-identity is not promised: float kernels may round differently per CPU model
# and per batch position.
SAME_IMAGE_TOLERANCE = 1


def max_pixel_difference(first: Image.Image, second: Image.Image) -> int:
    return int(np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).max())


def assert_same_image(first: Image.Image, second: Image.Image) -> None:
    """The guarantee above: same size and mode, every pixel within one level."""
    assert (first.size, first.mode) == (second.size, second.mode)
    difference = max_pixel_difference(first, second)
    assert difference <= SAME_IMAGE_TOLERANCE, f"pixels differ by up to {difference} levels"


def png_with_parameters(parameters: dict | None, size=(64, 64), color=(10, 120, 200), extra_text=None) -> bytes:
    """A PNG with `parameters` (JSON) in its text chunk, as the studio and the endpoint write them."""
    info = PngImagePlugin.PngInfo()
    for key, value in (extra_text or {}).items():
        info.add_text(key, value)
    if parameters is not None:
        info.add_text("parameters", json.dumps(parameters))
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class Clock:
    """A clock a test moves by hand (`clock.now += 61`), for what takes `clock=time.monotonic`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
