"""Base64 image decoding with size limits, and PNG encoding of results."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, PngImagePlugin

from .catalog import PARAMETERS
from .errors import RequestError

MAX_DECODED_BYTES = 20 * 1024 * 1024  # 20 MB of PNG/JPEG after base64 decoding
MAX_SIDE = 2048  # pixels, either side, checked from the header before any pixel is decoded
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes | str, field: str, *, mode: str = "RGB") -> Image.Image:
    """Decode one base64 image input, refusing anything over the limits.

    The header is read first and the pixel data only once the size is known to be
    within MAX_SIDE, so a small file that claims to be huge (a decompression bomb)
    costs nothing.
    """
    if isinstance(data, str):
        data = data.encode("ascii", errors="replace")
    # base64 grows data by 4/3: refuse before decoding anything too large.
    if len(data) > (MAX_DECODED_BYTES * 4) // 3 + 4:
        raise RequestError(field, f"is over the {MAX_DECODED_BYTES // (1024 * 1024)} MB limit")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64") from None
    if not raw:
        raise RequestError(field, "is empty")
    if len(raw) > MAX_DECODED_BYTES:
        raise RequestError(field, f"is over the {MAX_DECODED_BYTES // (1024 * 1024)} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width > MAX_SIDE or height > MAX_SIDE:
                raise RequestError(
                    field, f"is {width}x{height}, over the limit of {MAX_SIDE} px a side"
                )
            image.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(field, f"is over the limit of {MAX_SIDE} px a side") from None
    except Exception:  # PIL raises many types for bad bytes; all mean the same to the caller
        raise RequestError(field, f"is not a readable image ({', '.join(ALLOWED_FORMATS)})") from None
    return image.convert(mode)


def encode_png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG bytes, base64-encoded, with optional text chunks (e.g. the parameters)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue())


# The fallback when lossless PNG does not fit the answer limit: lossy WebP, at the best of these
# qualities that fits. The parameters report which ("png" or "webp q90", ...).
FALLBACK_QUALITIES = (95, 90, 80, 70, 60, 50)


def encode_webp(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=quality, method=4)
    return base64.b64encode(buffer.getvalue())


def encode_within(
    images: list[list[Image.Image]], texts: list[list[str]], budget_bytes: int
) -> tuple[list[list[bytes]], str]:
    """The images base64-encoded, all of them together within `budget_bytes`, and the encoding.

    Lossless PNG (with each image's `texts` entry as its parameters chunk) when it fits;
    otherwise WebP at the best quality in FALLBACK_QUALITIES that fits; otherwise a RequestError.
    """
    def total(encoded: list[list[bytes]]) -> int:
        return sum(len(data) for row in encoded for data in row)

    encoded = [
        [encode_png(image, {PARAMETERS: text}) for image, text in zip(row, row_texts)]
        for row, row_texts in zip(images, texts)
    ]
    if total(encoded) <= budget_bytes:
        return encoded, "png"
    png_bytes = total(encoded)
    for quality in FALLBACK_QUALITIES:
        encoded = [[encode_webp(image, quality) for image in row] for row in images]
        if total(encoded) <= budget_bytes:
            return encoded, f"webp q{quality}"
    count = sum(len(row) for row in images)
    raise RequestError(
        "gen_args",
        f"the answer would be {png_bytes / 2**20:.1f} MB as PNG and {total(encoded) / 2**20:.1f} MB even as "
        f"WebP quality {FALLBACK_QUALITIES[-1]}, over the {budget_bytes / 2**20:.1f} MB one answer may carry; "
        f"ask for fewer images per call (now {count}) or a smaller size",
    )
