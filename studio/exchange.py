"""A chain of results as a zip and back: what "Export" downloads and "Import" takes.

Pure functions: no Gradio, no store. `export_zip` reads the images through a function it is
given and returns the zip's bytes; `read_zip` returns a checked `Chain`; `import_entries` turns a
chain into history entries, saving its images through a function it is given.

The zip holds flat files (no folders) and `manifest.json`, written in this order:

    manifest.json
    01-generate.png             each step's result, with its parameters chunk, as the studio made it
    02-erase.png
    02-erase-image.png          a step's input image and mask, as the studio kept them
    02-erase-mask.png
    ...

    manifest.json = {
      "format": "sd-studio-chain", "version": 1,
      "steps": [                                 # lineage order: a step comes after its parent
        {"id": "<the exporting studio's id of the result>",
         "task": "erase",                        # the tab (studio.tasks.TASKS)
         "parameters": {...},                    # exactly those in the result's PNG
         "parent": "<id of the step it was made from>" | null,
         "file": "02-erase.png",
         "inputs": {"image": "02-erase-image.png", "mask": "02-erase-mask.png"}},   # those it had
        ...],
      "files": {"01-generate.png": {"bytes": 81234, "sha256": "<hex>"}, ...}    # every PNG, once
    }

A file may serve several steps (two edits of the same input). A step whose parent is in the zip
was made from the parent's result; its "image" input is what was sent (the same pixels), kept so
that a step whose parent is not in the zip can still be made again. Two exports of the same
chain are the same bytes: fixed timestamps and attributes, keys sorted, PNGs stored as they are.

A zip is hostile input (anyone signed in can drop one), so `read_zip` checks in this order, and
decompresses nothing before the zip's own records passed: the file's size; the end-of-directory
record (members and directory size, before the directory is parsed); each member's name
(`MEMBER_NAME`: flat, no path, no folder, no duplicates), method, flags, declared size,
compression ratio and the sum of the sizes; the manifest, read through a bounded stream, its JSON
shape (depth and items) scanned before it is parsed; that the manifest and the members name the
same files with the same sizes, and that the steps' links form no cycle; then each PNG in turn,
read through a bounded stream, its hash, its header and parameters (studio.metadata's bounded
reader), its size against the tab's limits, and only then its pixels. Every refusal is an
`ExchangeError` naming the limit. What comes out is written anew (`image_to_png`): nothing of a
file but its pixels and its parameters is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image

from studio.errors import StudioError
from studio.metadata import (
    MAX_PARAMETERS_BYTES,
    MAX_PARAMETERS_DEPTH,
    PngMetadataError,
    image_to_png,
    json_within,
    parse_parameters,
    read_parameters,
    read_png_head,
)
from studio.session import (
    HISTORY_LIMIT,
    INPUT_NAMES,
    MAX_IMAGE_PIXELS,
    MAX_RESULT_SIDE,
    MAX_UPLOAD_BYTES,
)
from studio.store import DEFAULT_MAX_BYTES
from studio.tasks import TASKS, task_of

FORMAT = "sd-studio-chain"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# 1980-01-01, the earliest time a zip can say: every export of a chain is the same bytes.
ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)
_UNIX = 3  # the "made by" system of every member: Unix, so the mode below is read as one
_FILE_MODE = 0o644 << 16

# --- limits ------------------------------------------------------------------------------------
# A session export is the history: at most HISTORY_LIMIT results (a chain is part of it).
MAX_STEPS = HISTORY_LIMIT
# Each step: its result and at most one file per input (INPUT_NAMES), and the manifest.
MAX_MEMBERS = 1 + MAX_STEPS * (1 + len(INPUT_NAMES))
# A PNG in the zip is one the studio makes or takes: at most what an upload may be.
MAX_PNG_BYTES = MAX_UPLOAD_BYTES
# The manifest: per step, its parameters (at most a PNG's) and its few short fields, and the
# files' sizes and hashes.
MAX_MANIFEST_BYTES = MAX_STEPS * (MAX_PARAMETERS_BYTES + 2048)
# manifest -> "steps" -> a step -> its parameters, nested as a PNG's may be.
MAX_MANIFEST_DEPTH = 3 + MAX_PARAMETERS_DEPTH
# Values in the manifest: per step, its fields, the endpoint's ~30 arguments and the studio's
# few lists in its parameters, its files' entries, with room to spare. Bounds what parsing builds
# (a 5 MB manifest of "[]," would be 100 MB of Python lists).
MAX_MANIFEST_ITEMS = MAX_STEPS * 512
# An import is kept as the importer's, whose share of the store is DEFAULT_MAX_BYTES: a zip that
# unpacks to more could not be kept whole.
MAX_TOTAL_BYTES = DEFAULT_MAX_BYTES
# Deflate packs at most ~1,032:1; a PNG is deflated already and packs again by little (the
# studio stores them as they are), JSON by about 10:1. A member may unpack to at most
# max(MAX_COMPRESSION_RATIO x its packed size, RATIO_FREE_BYTES).
MAX_COMPRESSION_RATIO = 100
RATIO_FREE_BYTES = 1024 * 1024
# A member's name: the studio's names ("02-erase-mask.png"), flat, short, plain ASCII.
MAX_NAME_STEM = 64
MEMBER_NAME = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_NAME_STEM - 1}}}\.png")
MAX_NAME_BYTES = MAX_NAME_STEM + len(".png")
# The central directory: 46 bytes a member, its name, and extra fields (times, Unix ids, ZIP64
# sizes) and a comment, which other zip tools add: 256 bytes of those.
MAX_DIRECTORY_BYTES = MAX_MEMBERS * (46 + MAX_NAME_BYTES + 256)
# The zip itself: its contents, each member's local header (about its directory record), the directory.
MAX_ZIP_BYTES = MAX_TOTAL_BYTES + 2 * MAX_DIRECTORY_BYTES
# A step's id, as the exporting studio wrote it (the store's are 32 hex digits).
STEP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_READ_BLOCK = 64 * 1024


class ExchangeError(StudioError):
    """A zip the studio does not take (or a chain it cannot export), with the reason and the limit."""


@dataclass(frozen=True)
class Limits:
    """What `read_zip` takes at most; the defaults are the module's (see there why)."""

    zip_bytes: int = MAX_ZIP_BYTES
    members: int = MAX_MEMBERS
    directory_bytes: int = MAX_DIRECTORY_BYTES
    png_bytes: int = MAX_PNG_BYTES
    manifest_bytes: int = MAX_MANIFEST_BYTES
    manifest_depth: int = MAX_MANIFEST_DEPTH
    manifest_items: int = MAX_MANIFEST_ITEMS
    total_bytes: int = MAX_TOTAL_BYTES
    compression_ratio: int = MAX_COMPRESSION_RATIO
    steps: int = MAX_STEPS


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Step:
    """One result of a chain: its PNG (its parameters embedded) and its inputs' PNGs, by name."""

    id: str  # the exporting studio's id: what `parent` links name
    task: str
    parameters: dict[str, Any]
    parent: str | None
    png: bytes
    inputs: dict[str, bytes]
    file: str  # its name in the zip, for messages


@dataclass(frozen=True)
class Chain:
    """Steps in lineage order (a parent before its children)."""

    steps: tuple[Step, ...]

    def step(self, step_id: str) -> Step:
        """The step of that id; KeyError when there is none."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)


# --- export ------------------------------------------------------------------------------------


def lineage(entries: Sequence[dict], result_id: str) -> list[dict]:
    """The chain that made `result_id`: its entry and its ancestors among `entries`, newest
    first (as `export_zip` takes them); empty when `result_id` is not there."""
    by_id = {entry.get("id"): entry for entry in reversed(entries)}  # the newest of a repeated id
    chain: list[dict] = []
    seen: set[str] = set()
    current = by_id.get(result_id)
    while current is not None and current["id"] not in seen:  # a forged history may loop
        chain.append(current)
        seen.add(current["id"])
        current = by_id.get(current.get("parent"))
    return chain


def export_zip(steps: Sequence[dict], read_png: Callable[[str], bytes | None]) -> bytes:
    """A zip of `steps` (history entries, newest first: the history, or `lineage`'s chain).

    `read_png(id)` gives an image's PNG as kept (None once the store let it go). A step whose
    result is gone is left out, and so is an input that is gone; a parent not among the steps is
    written as null (the step's input image then stands for it). The parameters are the PNG's own.
    Raises ExchangeError when the zip would be more than `read_zip` takes.
    """
    kept = _exportable(steps, read_png)
    if len(kept) > MAX_STEPS:
        raise ExchangeError(f"A session export holds at most {MAX_STEPS:,} steps; this one has {len(kept):,}.")
    digits = max(2, len(str(len(kept))))
    files: dict[str, bytes] = {}  # name -> PNG, in the order written
    names: dict[str, str] = {}  # store id -> name, so that a file shared by steps is written once
    manifest_steps = []
    for number, step in enumerate(kept, start=1):
        stem = f"{number:0{digits}d}-{step.task}"
        names[step.id] = f"{stem}.png"
        files[f"{stem}.png"] = step.png
        inputs = {}
        for name, input_id in step.inputs.items():
            if input_id not in names:
                data = read_png(input_id)
                if data is None:
                    continue
                names[input_id] = f"{stem}-{name}.png"
                files[f"{stem}-{name}.png"] = data
            inputs[name] = names[input_id]
        manifest_steps.append({"id": step.id, "task": step.task, "parameters": step.parameters, "parent": step.parent,
                               "file": f"{stem}.png", "inputs": inputs})
    total = sum(len(data) for data in files.values())
    if total > MAX_TOTAL_BYTES:
        raise ExchangeError(f"The export would be {total:,} bytes; an import takes at most {MAX_TOTAL_BYTES:,}.")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "steps": manifest_steps,
        "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()},
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _write(archive, MANIFEST_NAME, json.dumps(manifest, sort_keys=True, indent=1).encode("ascii"),
               zipfile.ZIP_DEFLATED)
        for name, data in files.items():
            _write(archive, name, data, zipfile.ZIP_STORED)  # deflated already
    return buffer.getvalue()


@dataclass(frozen=True)
class _Exported:
    id: str
    task: str
    parameters: dict[str, Any]
    parent: str | None
    inputs: dict[str, str]  # name -> store id, INPUT_NAMES order
    png: bytes


def _exportable(steps: Sequence[dict], read_png: Callable[[str], bytes | None]) -> list[_Exported]:
    """The steps whose image is still there, oldest first, parents before children (a parent
    not among them: None), each id once; the entries' fields as they must be (a history
    comes back from the browser)."""
    found: dict[str, _Exported] = {}
    for entry in reversed(steps):  # oldest first
        result_id = entry.get("id") if isinstance(entry, dict) else None
        if not _is_id(result_id) or result_id in found:
            continue
        png = read_png(result_id)
        parameters = read_parameters(png) if png is not None else None
        task = task_of(parameters) if parameters is not None else None
        if task is None:  # gone, or not a PNG of this studio
            continue
        given = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
        inputs = {name: given[name] for name in INPUT_NAMES if _is_id(given.get(name))}
        parent = entry.get("parent") if _is_id(entry.get("parent")) else None
        found[result_id] = _Exported(result_id, task.name, parameters, parent, inputs, png)
    return _in_lineage_order(list(found.values()))


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and STEP_ID.fullmatch(value) is not None


def _in_lineage_order(steps: list[_Exported]) -> list[_Exported]:
    """Parents before children, otherwise in the order given; a parent not among the steps is
    None, and a loop (a forged history) is cut where it is found."""
    present = {step.id for step in steps}
    pending, ordered, placed = list(steps), [], set()
    while pending:
        ready = next((step for step in pending if step.parent not in present or step.parent in placed), pending[0])
        pending.remove(ready)
        if ready.parent not in placed:  # not among the steps, or (a loop) not placed before it
            ready = dataclasses.replace(ready, parent=None)
        ordered.append(ready)
        placed.add(ready.id)
    return ordered


def _write(archive: zipfile.ZipFile, name: str, data: bytes, method: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
    info.compress_type, info.create_system, info.external_attr = method, _UNIX, _FILE_MODE
    archive.writestr(info, data)


# --- import ------------------------------------------------------------------------------------

Source = bytes | bytearray | memoryview | str | os.PathLike


def read_zip(data: Source, limits: Limits = DEFAULT_LIMITS) -> Chain:
    """The chain in an exported zip, every part checked (module docstring); ExchangeError if not."""
    if isinstance(data, (str, os.PathLike)):
        size = os.path.getsize(data)
        _check_zip_size(size, limits)
        with open(data, "rb") as stream:
            return _read(stream, size, limits)
    _check_zip_size(len(data), limits)
    return _read(io.BytesIO(data), len(data), limits)


def import_entries(chain: Chain, save: Callable[[bytes, str], str]) -> list[dict]:
    """History entries for a chain (newest first, as studio.session.add_to_history takes them),
    each image saved through `save(png, file name) -> id` (the store, as the importer's); the
    parent links and inputs name the new ids."""
    new_ids: dict[str, str] = {}
    entries = []
    for step in chain.steps:
        result_id = save(step.png, _download_name(step))
        inputs = {name: save(png, f"{step.task}-{name}.png") for name, png in step.inputs.items()}
        entries.append({"id": result_id, "task": step.task, "parameters": step.parameters,
                        "parent": new_ids.get(step.parent), "inputs": inputs})
        new_ids[step.id] = result_id
    return entries[::-1]


def _download_name(step: Step) -> str:
    seed = step.parameters.get("seed")
    return f"{step.task}-seed-{seed if isinstance(seed, int) and not isinstance(seed, bool) else 'unknown'}.png"


def _check_zip_size(size: int, limits: Limits) -> None:
    if size > limits.zip_bytes:
        raise ExchangeError(f"The zip is {size:,} bytes; a session export is at most {limits.zip_bytes:,}.")


def _read(stream: BinaryIO, size: int, limits: Limits) -> Chain:
    _check_directory(stream, size, limits)
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, struct.error) as error:
        # RuntimeError: NotImplementedError, for a version or feature zipfile does not read
        raise ExchangeError(f"That file is not a readable zip ({error}).") from None
    with archive:
        members = _checked_members(archive.infolist(), limits)
        manifest = _read_manifest(archive, members.pop(MANIFEST_NAME, None), limits)
        steps = _checked_steps(manifest, members, limits)
        return Chain(tuple(_read_step(archive, members, manifest["files"], step, limits) for step in steps))


# --- the zip's records, before any member is read -------------------------------------------------

_END = struct.Struct("<4sHHHHIIH")  # end of central directory: 22 bytes, then the comment
_END_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_END_SIGNATURE = b"PK\x06\x06"
_MAX_COMMENT = 0xFFFF


def _check_directory(stream: BinaryIO, size: int, limits: Limits) -> None:
    """The member count and the directory's size from the end records, before zipfile parses
    the directory (it builds an object per member)."""
    tail_size = min(size, _END.size + _MAX_COMMENT)
    stream.seek(size - tail_size)
    tail = stream.read(tail_size)
    at = tail.rfind(_END_SIGNATURE)
    if at < 0 or at + _END.size > len(tail):
        raise ExchangeError("That file is not a zip (it has no end-of-directory record).")
    _, disk, directory_disk, _, members, directory_bytes, _, _ = _END.unpack_from(tail, at)
    if (disk, directory_disk) != (0, 0):
        raise ExchangeError("The zip is split over several disks; a session export is one file.")
    if members == 0xFFFF or directory_bytes == 0xFFFFFFFF or members > limits.members:  # maybe ZIP64's
        zip64 = _zip64_end(stream, size - tail_size + at)
        if zip64 is not None:
            members, directory_bytes = zip64
    if members > limits.members:
        raise ExchangeError(f"The zip has {members:,} members; a session export has at most {limits.members:,}.")
    if directory_bytes > limits.directory_bytes:
        raise ExchangeError(
            f"The zip's directory is {directory_bytes:,} bytes; a session export's is at most {limits.directory_bytes:,}."
        )
    stream.seek(0)


def _zip64_end(stream: BinaryIO, end_at: int) -> tuple[int, int] | None:
    """(members, directory bytes) from the ZIP64 end record, when the zip has one."""
    if end_at < _ZIP64_LOCATOR.size:
        return None
    stream.seek(end_at - _ZIP64_LOCATOR.size)
    signature, _, offset, _ = _ZIP64_LOCATOR.unpack(stream.read(_ZIP64_LOCATOR.size))
    if signature != _ZIP64_LOCATOR_SIGNATURE or offset > end_at:
        return None
    stream.seek(offset)
    record = stream.read(_ZIP64_END.size)
    if len(record) != _ZIP64_END.size or record[:4] != _ZIP64_END_SIGNATURE:
        raise ExchangeError("The zip is damaged (its ZIP64 end record is missing).")
    *_, members, directory_bytes, _ = _ZIP64_END.unpack(record)
    return members, directory_bytes


def _checked_members(infos: list[zipfile.ZipInfo], limits: Limits) -> dict[str, zipfile.ZipInfo]:
    """The members by name, each checked from its directory record; nothing is decompressed."""
    if len(infos) > limits.members:
        raise ExchangeError(f"The zip has {len(infos):,} members; a session export has at most {limits.members:,}.")
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.filename
        shown = ascii(name)[1:-1][:80]
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
            raise ExchangeError(f"The zip's member {shown} has an absolute path; a session export's files have none.")
        if ".." in re.split(r"[/\\]", name):
            raise ExchangeError(f"The zip's member {shown} points outside the zip (..); a session export's files "
                                "are all at its top.")
        if name.endswith(("/", "\\")) or info.is_dir():
            raise ExchangeError(f"The zip holds a folder ({shown}); a session export has none.")
        if "/" in name or "\\" in name:
            raise ExchangeError(f"The zip's member {shown} is in a folder; a session export's files are all at its top.")
        if name != MANIFEST_NAME and not MEMBER_NAME.fullmatch(name):
            raise ExchangeError(f"The zip's member {shown} is not a file of a session export (manifest.json and "
                                "PNGs named like 02-erase.png).")
        if name in members:
            raise ExchangeError(f"The zip holds {shown} twice; each file of a session export is there once.")
        if info.flag_bits & 0x1:
            raise ExchangeError(f"The zip's member {shown} is encrypted; a session export is not.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ExchangeError(f"The zip's member {shown} is compressed with method {info.compress_type}; "
                                "a session export uses only stored and deflated members.")
        limit = limits.manifest_bytes if name == MANIFEST_NAME else limits.png_bytes
        what = "the manifest of a session export" if name == MANIFEST_NAME else "a PNG of a session export"
        if info.file_size > limit:
            raise ExchangeError(f"The zip's member {shown} unpacks to {info.file_size:,} bytes; {what} is at most "
                                f"{limit:,}.")
        if info.file_size > max(limits.compression_ratio * info.compress_size, RATIO_FREE_BYTES):
            raise ExchangeError(
                f"The zip's member {shown} unpacks to {info.file_size:,} bytes from {info.compress_size:,}, "
                f"more than {limits.compression_ratio}:1; a session export is packed at most that tightly."
            )
        total += info.file_size
        if total > limits.total_bytes:
            raise ExchangeError(f"The zip unpacks to more than {limits.total_bytes:,} bytes, the most an import takes.")
        members[name] = info
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, read in blocks and never more than `limit` (or its declared size):
    a header that understates the size does not let more through."""
    limit = min(limit, info.file_size)
    parts, count = [], 0
    try:
        with archive.open(info) as stream:
            while True:
                block = stream.read(min(_READ_BLOCK, limit + 1 - count))
                if not block:
                    break
                count += len(block)
                if count > limit:
                    raise ExchangeError(f"The zip's member {info.filename} holds more than its {limit:,} bytes.")
                parts.append(block)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, struct.error) as error:
        # RuntimeError: zipfile's word for an encrypted member or an unknown method (refused before)
        raise ExchangeError(f"The zip's member {info.filename} is damaged ({error}).") from None
    data = b"".join(parts)
    if len(data) != info.file_size:
        raise ExchangeError(f"The zip's member {info.filename} is {len(data):,} bytes, not the {info.file_size:,} "
                            "its header says.")
    return data


# --- the manifest ----------------------------------------------------------------------------------


def _read_manifest(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None, limits: Limits) -> dict:
    if info is None:
        raise ExchangeError(f"The zip has no {MANIFEST_NAME}; it is not a session export of the studio.")
    try:
        text = _read_member(archive, info, limits.manifest_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise ExchangeError(f"The zip's {MANIFEST_NAME} is not UTF-8 text.") from None
    _check_json_shape(text, limits)
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError):
        raise ExchangeError(f"The zip's {MANIFEST_NAME} is not readable JSON.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExchangeError(f"The zip's {MANIFEST_NAME} is not a session export's (its format is not {FORMAT!r}).")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExchangeError(f"The zip is a session export of version {ascii(manifest.get('version'))[:20]}; "
                            f"this studio reads version {FORMAT_VERSION}.")
    return manifest


_JSON_TOKENS = re.compile(r'[",\[\]{}]')
# Possessive: the rest of a string in one pass, with no backtracking state kept (a plain
# "(?:[^"\\]|\\.)*" keeps some for every character: 700 MB for a 5 MB string).
_JSON_STRING_REST = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


def _check_json_shape(text: str, limits: Limits) -> None:
    """Depth and item count of a JSON text, scanned before it is parsed: what parsing would build
    is bounded. Each string is skipped by one anchored match (linear, whatever it holds); the
    scan stops at the first limit passed."""
    depth = items = 0
    position = 0
    while True:
        token = _JSON_TOKENS.search(text, position)
        if token is None:
            return
        character, position = token.group(), token.end()
        if character == '"':
            rest = _JSON_STRING_REST.match(text, position)
            if rest is None:
                raise ExchangeError(f"The zip's {MANIFEST_NAME} is not readable JSON (a string never ends).")
            position = rest.end()
            continue
        if character in "[{":
            depth += 1
            if depth > limits.manifest_depth:
                raise ExchangeError(
                    f"The zip's {MANIFEST_NAME} is nested more than {limits.manifest_depth} deep; a session export's "
                    f"is at most {limits.manifest_depth}."
                )
        elif character in "]}":
            depth -= 1
        items += 1
        if items > limits.manifest_items:
            raise ExchangeError(
                f"The zip's {MANIFEST_NAME} holds more than {limits.manifest_items:,} values; a session export's "
                f"holds at most {limits.manifest_items:,}."
            )


def _checked_steps(manifest: dict, members: dict[str, zipfile.ZipInfo], limits: Limits) -> list[dict]:
    """The manifest's steps, each well-formed, in lineage order, naming exactly the zip's files."""
    steps, files = manifest.get("steps"), manifest.get("files")
    if not isinstance(steps, list) or not isinstance(files, dict):
        raise ExchangeError(f"The zip's {MANIFEST_NAME} has no list of steps and files.")
    if not steps:
        raise ExchangeError("The zip's chain has no steps.")
    if len(steps) > limits.steps:
        raise ExchangeError(f"The zip's chain has {len(steps):,} steps; a session export has at most {limits.steps:,}.")
    for name, listed in files.items():
        if name not in members:
            raise ExchangeError(f"The manifest lists {ascii(name)[1:-1][:80]}, which is not in the zip.")
        if not (isinstance(listed, dict) and type(listed.get("bytes")) is int
                and isinstance(listed.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", listed["sha256"])):
            raise ExchangeError(f"The manifest's entry for {name} gives no size and SHA-256.")
        if listed["bytes"] != members[name].file_size:
            raise ExchangeError(f"The manifest says {name} is {listed['bytes']:,} bytes; the zip's is "
                                f"{members[name].file_size:,}.")
    unlisted = sorted(set(members) - set(files))
    if unlisted:
        raise ExchangeError(f"The zip holds {unlisted[0]}, which the manifest does not list.")
    checked = [_checked_step(number, step, files) for number, step in enumerate(steps, start=1)]
    used = {step["file"] for step in checked} | {name for step in checked for name in step["inputs"].values()}
    unused = sorted(set(files) - used)
    if unused:
        raise ExchangeError(f"The manifest lists {unused[0]}, which no step uses.")
    _check_links(checked)
    return checked


def _checked_step(number: int, step: Any, files: dict) -> dict:
    where = f"Step {number} of the manifest"
    if not isinstance(step, dict):
        raise ExchangeError(f"{where} is not an object.")
    step_id, task, parameters, parent = step.get("id"), step.get("task"), step.get("parameters"), step.get("parent")
    file, inputs = step.get("file"), step.get("inputs")
    if not (isinstance(step_id, str) and STEP_ID.fullmatch(step_id)):
        raise ExchangeError(f"{where} has no valid id (letters, digits, - and _, at most 64).")
    if not (parent is None or (isinstance(parent, str) and STEP_ID.fullmatch(parent))):
        raise ExchangeError(f"{where} has a parent that is not a step id.")
    if not (isinstance(task, str) and task in TASKS):
        raise ExchangeError(f"{where} names no tab of this studio ({ascii(task)[:40]}); the tabs are "
                            f"{', '.join(TASKS)}.")
    if not (isinstance(parameters, dict)
            and json_within(parameters, max_chars=MAX_PARAMETERS_BYTES, max_depth=MAX_PARAMETERS_DEPTH)):
        raise ExchangeError(f"{where} has parameters that are not an object of at most {MAX_PARAMETERS_BYTES:,} "
                            f"characters, {MAX_PARAMETERS_DEPTH} deep.")
    made_by = task_of(parameters)
    if made_by is None or made_by.name != task:
        raise ExchangeError(f"{where} says {task}, but its parameters are not of that tab.")
    if not (isinstance(file, str) and file in files):
        raise ExchangeError(f"{where} names a result file the manifest does not list.")
    if not (isinstance(inputs, dict)
            and all(name in INPUT_NAMES and isinstance(value, str) and value in files for name, value in inputs.items())):
        raise ExchangeError(f"{where} has inputs other than {' and '.join(INPUT_NAMES)}, or names a file the "
                            "manifest does not list.")
    spec = TASKS[task]
    if "image" in inputs and not spec.takes_image:
        raise ExchangeError(f"{where} is {task}, which takes no input image.")
    if "mask" in inputs and not (spec.takes_mask and "image" in inputs):
        raise ExchangeError(f"{where} has a mask without an image, or is {task}, which takes no mask.")
    return {"id": step_id, "task": task, "parameters": parameters, "parent": parent, "file": file,
            "inputs": dict(inputs), "number": number}


def _check_links(steps: list[dict]) -> None:
    """Ids once each; every parent a step of the zip; no cycle; each parent before its children."""
    position: dict[str, int] = {}
    for step in steps:
        if step["id"] in position:
            raise ExchangeError(f"Steps {position[step['id']] + 1} and {step['number']} of the manifest have the "
                                "same id.")
        position[step["id"]] = step["number"] - 1
    parents = {step["id"]: step["parent"] for step in steps}
    for step in steps:
        if step["parent"] is not None and step["parent"] not in parents:
            raise ExchangeError(f"Step {step['number']} of the manifest names a parent that is not in the zip.")
    for step in steps:
        seen, current = [], step["id"]
        while current is not None:
            if current in seen:
                loop = " → ".join(str(position[each] + 1) for each in seen[seen.index(current):] + [current])
                raise ExchangeError(f"The steps' parent links form a cycle (steps {loop}); a chain has none.")
            seen.append(current)
            current = parents[current]
    for step in steps:
        if step["parent"] is not None and position[step["parent"]] > position[step["id"]]:
            raise ExchangeError(f"Step {step['number']} of the manifest comes before its parent; the steps are "
                                "in lineage order.")


# --- the images ------------------------------------------------------------------------------------


def _read_step(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], files: dict, step: dict,
               limits: Limits) -> Step:
    task = TASKS[step["task"]]
    png = _png(archive, members, files, step["file"], limits, MAX_RESULT_SIDE, "a result of the studio",
               parameters=step["parameters"])
    inputs, image_size = {}, None
    for name in INPUT_NAMES:  # the image first: the mask must be its size
        if name not in step["inputs"]:
            continue
        max_side = task.max_image_side or MAX_RESULT_SIDE
        data = _png(archive, members, files, step["inputs"][name], limits, max_side, f"{task.title}'s input",
                    mode="L" if name == "mask" else "RGB", size=image_size)
        image_size = image_size or _size(data)
        inputs[name] = data
    return Step(step["id"], step["task"], step["parameters"], step["parent"], png, inputs, step["file"])


def _png(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], files: dict, name: str, limits: Limits,
         max_side: int, title: str, *, parameters: dict | None = None, mode: str = "RGB",
         size: tuple[int, int] | None = None) -> bytes:
    """A member's PNG checked from its header (size, parameters) before its pixels are decoded,
    then written anew with only its pixels (as `mode`) and its parameters."""
    data = _read_member(archive, members[name], limits.png_bytes)
    if hashlib.sha256(data).hexdigest() != files[name]["sha256"]:
        raise ExchangeError(f"{name} is not the file the manifest lists (its SHA-256 differs).")
    try:
        head = read_png_head(data)
    except PngMetadataError as error:
        raise ExchangeError(f"{name}: {error}") from None
    width, height = head.width, head.height
    if max(width, height) > max_side or width * height > MAX_IMAGE_PIXELS:
        raise ExchangeError(f"{name} is {width:,}×{height:,} px; {title} is at most {max_side:,} px a side.")
    if size is not None and (width, height) != size:
        raise ExchangeError(f"{name} is {width}×{height} px; a mask is the size of its image, {size[0]}×{size[1]} px.")
    if parameters is not None:
        try:
            embedded = parse_parameters(head.parameters_text) if head.parameters_text is not None else None
        except PngMetadataError as error:
            raise ExchangeError(f"{name}: {error}") from None
        if embedded != parameters:
            raise ExchangeError(f"{name} carries other parameters than the manifest says it does.")
    image = _decode(name, data, (width, height))
    return image_to_png(image if image.mode == mode else image.convert(mode), parameters)


def _decode(name: str, data: bytes, size: tuple[int, int]) -> Image.Image:
    """The pixels of a PNG whose header was checked (PIL's own bomb limit, studio.session's, applies too)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != size:
                raise ExchangeError(f"{name}'s header gives two sizes.")
            image.load()
            return image.copy() if image.mode in ("RGB", "RGBA", "L", "LA", "P") else image.convert("RGB")
    except ExchangeError:
        raise
    except Exception:  # noqa: BLE001 -- PIL raises many types for bad bytes (DecompressionBombError among them)
        raise ExchangeError(f"{name} is not a readable PNG.") from None


def _size(png: bytes) -> tuple[int, int]:
    head = read_png_head(png)
    return head.width, head.height


def decode_png(png: bytes) -> Image.Image:
    """A chain's PNG (checked and written anew by `read_zip`) as an image."""
    with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
        image.load()
        return image.copy()
