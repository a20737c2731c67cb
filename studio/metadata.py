"""Generation parameters inside a PNG, as a text chunk: written on every result, read back on drop.

The endpoint already writes the chunk (key sdserve.catalog.PARAMETERS, JSON) into every image it returns;
the studio makes sure it is there, so that a download always carries what made it.

Reading them back is done on files anyone can drop on the studio, so it decodes no pixel: it
walks the PNG's chunks from the start up to the image data (where PIL and the endpoint write
their text chunks), reads at most MAX_PNG_HEAD_BYTES of the file, and parses a parameters chunk
only up to MAX_PARAMETERS_BYTES, nested at most MAX_PARAMETERS_DEPTH deep. Anything else is a
`PngMetadataError` saying what is wrong (`read_parameters` turns it into None).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin
from sdserve.catalog import MAX_PROMPT_CHARS, PARAMETERS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The parameters are JSON written with json.dumps (ASCII: a character takes at most 12 bytes, a
# surrogate pair of \\u escapes): the prompt and the negative prompt, each at most
# MAX_PROMPT_CHARS, and a few kilobytes of numbers and names besides.
MAX_PARAMETERS_BYTES = 2 * MAX_PROMPT_CHARS * 12 + 16 * 1024
# Parameters are a flat object with a few small lists and objects ("seeds", "tiles"): no deeper.
MAX_PARAMETERS_DEPTH = 8
# The chunks before the image data: the header, the text chunks and what else an editor may have
# put there (a colour profile, EXIF): more than that is not a PNG the studio made.
MAX_PNG_HEAD_BYTES = 1024 * 1024
MAX_CHUNK_LENGTH = 2**31 - 1  # the PNG specification's own limit
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_KEYWORD_BYTES = 79  # a text chunk's keyword, by the specification


class PngMetadataError(ValueError):
    """A file whose parameters cannot be read, with the reason in words for a designer."""


@dataclass(frozen=True)
class PngHead:
    """What the start of a PNG says: its size (from the header) and its parameters text, if any."""

    width: int
    height: int
    parameters_text: str | None


Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO


def read_parameters(png: Source) -> dict[str, Any] | None:
    """The parameters embedded in a PNG, or None for any other file (or one over the limits)."""
    try:
        return parameters_from_png(png)
    except PngMetadataError:
        return None


def parameters_from_png(png: Source) -> dict[str, Any]:
    """The parameters embedded in a PNG; a PngMetadataError saying why there are none."""
    head = read_png_head(png)
    if head.parameters_text is None:
        raise PngMetadataError("That PNG carries no studio parameters.")
    return parse_parameters(head.parameters_text)


def parse_parameters(text: str) -> dict[str, Any]:
    """A parameters chunk's JSON as a dict, refused when it is too long, too deep or not an object."""
    if len(text) > MAX_PARAMETERS_BYTES:
        raise PngMetadataError(f"The PNG's parameters are over {MAX_PARAMETERS_BYTES // 1024} KB; they are not read.")
    try:
        parameters = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the interpreter's limit
        raise PngMetadataError("The PNG's parameters are not readable JSON.") from None
    if not isinstance(parameters, dict):
        raise PngMetadataError("The PNG's parameters are not a JSON object.")
    if not json_within(parameters, max_chars=MAX_PARAMETERS_BYTES, max_depth=MAX_PARAMETERS_DEPTH):
        raise PngMetadataError(f"The PNG's parameters are nested more than {MAX_PARAMETERS_DEPTH} deep.")
    return parameters


def read_png_head(
    source: Source,
    *,
    key: str = PARAMETERS,
    max_bytes: int = MAX_PNG_HEAD_BYTES,
    max_text_bytes: int = MAX_PARAMETERS_BYTES,
) -> PngHead:
    """Walk a PNG's chunks up to its image data, without decoding anything: its size and its
    `key` text (tEXt, zTXt or iTXt; the first one). At most `max_bytes` of the source are read,
    and a text chunk under `key` is taken only up to `max_text_bytes` (compressed ones too).
    Chunk lengths are checked against what is left, and the header's and the text's CRCs are
    checked. Raises PngMetadataError.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as stream:
            return read_png_head(stream, key=key, max_bytes=max_bytes, max_text_bytes=max_text_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    reader = _BoundedReader(source, max_bytes)
    try:
        signature = reader.read(len(PNG_SIGNATURE), "signature")
    except PngMetadataError:
        signature = b""
    if signature != PNG_SIGNATURE:
        raise PngMetadataError("That file is not a PNG.")
    wanted = key.encode("latin-1")
    size: tuple[int, int] | None = None
    text: str | None = None
    for kind, length in _chunks(reader):
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise PngMetadataError("That PNG has no valid header.")
            data = _checked(reader, kind, length)
            width, height = struct.unpack(">II", data[:8])
            if not (0 < width <= MAX_CHUNK_LENGTH and 0 < height <= MAX_CHUNK_LENGTH):
                raise PngMetadataError("That PNG's header gives no valid size.")
            size = (width, height)
        elif kind in (b"IDAT", b"IEND"):
            break  # the image data: the text chunks the studio reads are before it
        elif kind in TEXT_CHUNKS and text is None:
            keyword = reader.peek_keyword(length)
            if keyword != wanted:
                reader.skip(length + 4)
                continue
            if length > max_text_bytes + MAX_KEYWORD_BYTES + 5:  # keyword, separators, flags
                raise PngMetadataError(
                    f"The PNG's {key} chunk is {length} bytes, over the {max_text_bytes // 1024} KB limit; it is not read."
                )
            text = _text(kind, _checked(reader, kind, length), max_text_bytes)
        else:
            reader.skip(length + 4)  # data and CRC of a chunk the studio does not read
    if size is None:
        raise PngMetadataError("That PNG has no valid header.")
    return PngHead(size[0], size[1], text)


class _BoundedReader:
    """Reads a stream from its current position, never more than `limit` bytes in all."""

    def __init__(self, stream: BinaryIO, limit: int):
        self.stream, self.limit, self.done = stream, limit, 0
        self.pending = b""  # bytes peeked at and not yet consumed

    def read(self, count: int, what: str = "chunk") -> bytes:
        data, self.pending = self.pending[:count], self.pending[count:]
        needed = count - len(data)
        if needed > 0:
            if self.done + needed > self.limit:
                raise PngMetadataError(
                    f"That PNG's {what} goes past the first {self.limit // 1024} KB, where the studio looks for "
                    "its parameters."
                )
            more = self.stream.read(needed)
            self.done += len(more)
            data += more
        if len(data) != count:
            raise PngMetadataError("That PNG is cut short.")
        return data

    def peek_keyword(self, length: int) -> bytes | None:
        """A text chunk's keyword (its bytes before the first NUL), leaving the chunk unread."""
        start = self.read(min(length, MAX_KEYWORD_BYTES + 1), "text")
        self.pending = start + self.pending
        end = start.find(b"\0")
        return start[:end] if end > 0 else None

    def skip(self, count: int) -> None:
        while count > 0:  # in blocks: a huge length is refused at the limit, not allocated
            step = min(count, 64 * 1024)
            self.read(step)
            count -= step


def _chunks(reader: _BoundedReader) -> Iterator[tuple[bytes, int]]:
    """(type, length) of each chunk; the reader is then at its data."""
    while True:
        length, kind = struct.unpack(">I4s", reader.read(8))
        if length > MAX_CHUNK_LENGTH or not kind.isalpha():  # isalpha: ASCII letters only, for bytes
            raise PngMetadataError("That PNG is damaged (a chunk has an invalid type or length).")
        yield kind, length


def _checked(reader: _BoundedReader, kind: bytes, length: int) -> bytes:
    data = reader.read(length)
    (crc,) = struct.unpack(">I", reader.read(4))
    if zlib.crc32(kind + data) != crc:
        raise PngMetadataError("That PNG is damaged (a checksum does not match).")
    return data


def _text(kind: bytes, data: bytes, max_bytes: int) -> str:
    """The text of a tEXt, zTXt or iTXt chunk whose keyword was already checked."""
    _, _, rest = data.partition(b"\0")
    try:
        if kind == b"tEXt":
            return rest.decode("latin-1")
        if kind == b"zTXt":
            if rest[:1] != b"\0":
                raise PngMetadataError("That PNG's parameters use an unknown compression.")
            return _inflate(rest[1:], max_bytes).decode("latin-1")
        compressed, method, rest = rest[:1], rest[1:2], rest[2:]
        _language, _, rest = rest.partition(b"\0")
        _translated, separator, rest = rest.partition(b"\0")
        if not separator or compressed not in (b"\0", b"\1") or (compressed == b"\1" and method != b"\0"):
            raise PngMetadataError("That PNG's parameters chunk is damaged.")
        return (_inflate(rest, max_bytes) if compressed == b"\1" else rest).decode("utf-8")
    except UnicodeDecodeError:
        raise PngMetadataError("That PNG's parameters are not readable text.") from None


def _inflate(data: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        raise PngMetadataError("That PNG's parameters chunk is damaged.") from None
    if len(text) > max_bytes:
        raise PngMetadataError(f"The PNG's parameters are over {max_bytes // 1024} KB; they are not read.")
    return text


def json_within(value: Any, *, max_chars: int, max_depth: int) -> bool:
    """Whether a JSON-like value is at most `max_depth` deep and about `max_chars` long as JSON
    (its strings' lengths plus a few characters per item); the walk stops as soon as it is not,
    so a huge value costs no more than a small one. Any non-JSON type makes it False."""
    budget = max_chars
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 4
        if isinstance(item, str):
            budget -= len(item)
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                return False
            if isinstance(item, dict):
                for name in item:
                    if not isinstance(name, str):
                        return False
                    budget -= len(name) + 4
                    if budget < 0:
                        return False
                children = item.values()
            else:
                children = item
            for child in children:
                stack.append((child, depth + 1))
                budget -= 1
                if budget < 0:
                    return False
        elif not (item is None or isinstance(item, (bool, int, float))):
            return False
        if budget < 0:
            return False
    return True


def embed_parameters(png: bytes, parameters: dict[str, Any]) -> bytes:
    """The PNG with `parameters` in its text chunk; unchanged bytes when they are already there."""
    if read_parameters(png) == parameters:
        return png
    with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
        info = PngImagePlugin.PngInfo()
        for key, value in image.text.items():
            if key != PARAMETERS:
                info.add_text(key, value)
        info.add_text(PARAMETERS, json.dumps(parameters))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_to_png(image: Image.Image, parameters: dict[str, Any] | None = None) -> bytes:
    buffer = io.BytesIO()
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS, json.dumps(parameters))
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
