"""A session's results as plain data: history entries, what a result restores, what it carries on.

An entry is a small JSON object (the browser keeps the history, so it must stay small):

    {"id": "<store id of the PNG>", "task": "erase",
     "parameters": {...what the endpoint reported for this one image, its own seed included...},
     "parent": "<store id>" | None,   # the result it was made from (its lineage), None when fresh
     "inputs": {"image": "<store id>", "mask": "<store id>"},     # the task's input images, if any
     "signature": "<64 hex digits>"}   # HMAC of owner, id, task, inputs, parent (studio/signing.py)

"parent" is the result that was sent to the tab (Send to, a history entry picked into its tab,
Vary) when the job's input image is that result's pixels; None for a fresh upload or Generate.
Results made from one parent are a branch; "Export" writes a result's lineage (studio/exchange.py).

Every entry is its owner's (the designer it was made for): the studio signs it for them, and
reads an entry's images only for an owner whose signature it carries and whom the store keeps
them for (`entry_is_owned`), so an entry copied or forged in the browser reads nothing.

An entry made from a dropped PNG whose image the studio does not keep has "id": None and no
signature (see `entry_from_png`); it restores parameters only and never enters the history.

Also here: the limits on what the studio decodes, in one place (see "Upload limits" below).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from PIL import Image
from sdserve.checkpoint import RANDOM_KINDS
from sdserve.images import ALLOWED_FORMATS
from sdserve.params import SEED_MAX

from studio import signing
from studio.errors import StudioError
from studio.metadata import (
    MAX_PARAMETERS_BYTES,
    MAX_PARAMETERS_DEPTH,
    PngMetadataError,
    embed_parameters,
    image_to_png,
    json_within,
    parse_parameters,
    read_parameters,
    read_png_head,
)
from studio.results import GenerationResult
from studio.store import DEFAULT_OWNER, ID_PATTERN, ResultStore
from studio.tasks import TASKS, Task, check_side, task_of

HISTORY_LIMIT = 50
# How far "Vary" moves from the picture it varies: recognisably the same picture, visibly another take.
VARY_STRENGTH = 0.3
CAPTION_PROMPT_CHARS = 60
INPUT_NAMES = ("image", "mask")

Entry = dict[str, Any]


# --- upload limits ---------------------------------------------------------------------------
# Everything the studio decodes is bounded by the model table: the largest input a tab takes
# (MAX_INPUT_SIDE, each tab's own in Task.max_image_side) and the largest image it makes itself
# (MAX_RESULT_SIDE: an upscale of the largest input). PIL refuses more than twice
# Image.MAX_IMAGE_PIXELS when it opens a file, before any pixel is decoded; an upload is
# checked against its tab's own side limit from its header (`check_upload`) before that.

MAX_INPUT_SIDE = max(task.max_image_side for task in TASKS.values() if task.takes_image)


def _largest_result_side(task: Task) -> int:
    sizes = [task.max_image_side or 0] + [
        int(control.maximum) for control in task.controls if control.name in ("width", "height")
    ]
    return max(sizes) * task.spec.output_scale


MAX_RESULT_SIDE = max(_largest_result_side(task) for task in TASKS.values())
MAX_IMAGE_PIXELS = MAX_RESULT_SIDE * MAX_RESULT_SIDE
# The largest file an upload may be (Gradio's launch(max_file_size=...)): the studio's own largest
# PNG, an RGB MAX_RESULT_SIDE square stored without compression (PNG's worst case, one filter
# byte a row, deflate's 5 bytes per 64 KB block and the chunks' 12), with room for its metadata;
# so every image the studio hands out can be dropped back, and nothing much larger reaches it.
_RAW_RESULT_BYTES = MAX_RESULT_SIDE * (1 + 3 * MAX_RESULT_SIDE)
MAX_UPLOAD_BYTES = _RAW_RESULT_BYTES + _RAW_RESULT_BYTES // 1000 + MAX_PARAMETERS_BYTES + 1024 * 1024


def limit_image_decoding() -> None:
    """Set PIL's decompression-bomb limit for the studio's process (done on import; idempotent):
    it warns above MAX_IMAGE_PIXELS and refuses above twice that, when a file is opened."""
    current = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS if current is None else min(current, MAX_IMAGE_PIXELS)


limit_image_decoding()


def check_upload(source: str | os.PathLike | bytes | BinaryIO, max_side: int = MAX_INPUT_SIDE,
                 title: str = "The studio") -> tuple[int, int]:
    """An uploaded image's (width, height), read from its header only; a StudioError when it is
    not a PNG, JPEG or WebP, or is over `max_side` px a side (so its pixels are never decoded)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with Image.open(source, formats=ALLOWED_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise StudioError(f"The image is far too large: {title} accepts at most {max_side} px a side.") from None
    except Exception:  # PIL raises many types for bad bytes; all mean the same here
        raise StudioError(f"That file is not a readable image ({', '.join(ALLOWED_FORMATS)}).") from None
    check_side(width, height, max_side, title)  # the tabs' own rule (Task.check), before decoding
    return width, height


# --- entries -----------------------------------------------------------------------------------


def record_result(
    store: ResultStore, task: Task, result: GenerationResult, inputs: dict[str, Image.Image] | None = None,
    *, owner: str = DEFAULT_OWNER, parent: str | None = None,
) -> list[Entry]:
    """Keep a result's PNGs (parameters embedded) and its inputs in the store, as `owner`'s;
    one entry per image, made from `parent` (an id, see the module's docstring), signed for
    `owner`. Each PNG is read, and saved (hashed), once."""
    input_ids = keep_inputs(store, task, inputs, owner=owner)
    entries = []
    for index, png in enumerate(result.png):
        # The endpoint embeds each image's own parameters; fall back to the result's with this image's seed.
        parameters = read_parameters(png)
        if parameters is None:
            parameters = {**result.parameters, "seed": _nth_seed(result, index)}
            png = embed_parameters(png, parameters)
        result_id = store.save(png, _file_name(task, parameters), owner=owner)
        entries.append(signed_entry(store, {"id": result_id, "task": task.name, "parameters": parameters,
                                            "parent": parent, "inputs": input_ids}, owner=owner))
    return entries


def signed_entry(store: ResultStore, entry: Entry, *, owner: str) -> Entry:
    """`entry` (id, task, parameters, parent, inputs) signed for `owner`, as every entry the studio hands out
    is: the store must keep its images for `owner` too (save them as theirs) for it to read any."""
    return signing.signed(store.key, owner, entry)


def with_inputs(store: ResultStore, entries: list[Entry], input_ids: dict[str, str], *,
                owner: str = DEFAULT_OWNER) -> list[Entry]:
    """The entries with these inputs (`keep_inputs`' ids), signed anew for `owner`."""
    return [signed_entry(store, {**entry, "inputs": input_ids}, owner=owner) for entry in entries]


def keep_inputs(store: ResultStore, task: Task, inputs: dict[str, Image.Image] | None, *,
                owner: str = DEFAULT_OWNER) -> dict[str, str]:
    """A job's input images kept in the store, as `owner`'s: their ids by name, as an entry's "inputs"."""
    return {
        name: store.save(image_to_png(image), f"{task.name}-{name}.png", owner=owner)
        for name, image in (inputs or {}).items()
    }


def _file_name(task: Task, parameters: dict[str, Any]) -> str:
    """What a download is called: the task and the seed (a seed that is no seed is "unknown")."""
    seed = parameters.get("seed")
    valid = isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX
    return f"{task.name}-seed-{seed if valid else 'unknown'}.png"


def _nth_seed(result: GenerationResult, index: int) -> Any:
    seeds = result.seeds
    return seeds[index] if index < len(seeds) else seeds[0]


def restore_from_png(
    store: ResultStore, png: str | os.PathLike | bytes | BinaryIO, *, owner: str = DEFAULT_OWNER
) -> Entry:
    """The entry a dropped PNG restores, or a StudioError saying why it restores nothing.

    Only the parameters are taken from the file: it is read up to its image data and never
    kept as it came (it could carry anything after or around its pixels). The image is kept,
    as `owner`'s, only when a tab could take it as an input (at most its task's input side, or
    MAX_INPUT_SIDE): then it is decoded and written anew, with its parameters and nothing else,
    so it shows as the restored result and can be sent on (the entry is signed for `owner`). A
    larger image (an upscale) restores its parameters only: the entry's "id" is None, and the
    designer has the file already.
    """
    try:
        head = read_png_head(png)
        if head.parameters_text is None:
            raise PngMetadataError("That PNG carries no studio parameters.")
        parameters = parse_parameters(head.parameters_text)
    except PngMetadataError as error:
        raise StudioError(str(error)) from None
    except OSError:
        raise StudioError("That file could not be read.") from None
    task = task_of(parameters)
    if task is None:
        raise StudioError("That PNG's parameters are not from a model of this studio.")
    if max(head.width, head.height) <= (task.max_image_side or MAX_INPUT_SIDE):
        image = _decode_png(png, head)
        if image is not None:
            result_id = store.save(image_to_png(image, parameters), _file_name(task, parameters), owner=owner)
            return signed_entry(store, {"id": result_id, "task": task.name, "parameters": parameters,
                                        "parent": None, "inputs": {}}, owner=owner)
    return {"id": None, "task": task.name, "parameters": parameters, "inputs": {}}


def entry_from_png(store: ResultStore, png: Any, *, owner: str = DEFAULT_OWNER) -> Entry | None:
    """`restore_from_png`'s entry, or None when the PNG restores nothing."""
    try:
        return restore_from_png(store, png, owner=owner)
    except StudioError:
        return None


def _decode_png(png: Any, head: Any) -> Image.Image | None:
    """The pixels of a PNG whose header was read already and found within the limits; None when
    they cannot be decoded (the parameters are restored all the same)."""
    if isinstance(png, (bytes, bytearray, memoryview)):
        png = io.BytesIO(png)
    elif hasattr(png, "seek"):
        png.seek(0)
    try:
        with Image.open(png, formats=["PNG"]) as image:
            if image.size != (head.width, head.height):
                return None
            image.load()
            return image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
    except Exception:  # a damaged image after a good header: no image, the parameters still
        return None


def entry_is_owned(entry: Any, store: ResultStore, *, owner: str) -> bool:
    """Whether `entry` is one the studio signed for `owner`, and the store keeps its image for them:
    the check before any of an entry's images is read or served."""
    return (
        isinstance(entry, dict)
        and _well_formed(entry)
        and signing.signature_matches(store.key, owner, entry)
        and store.keeps(entry["id"], owner=owner)
    )


def _well_formed(entry: dict) -> bool:
    """An entry's id, task, parent and inputs have their types (so they can be hashed and looked up)."""
    result_id, task, inputs, parent = entry.get("id"), entry.get("task"), entry.get("inputs", {}), entry.get("parent")
    return (
        isinstance(result_id, str)
        and ID_PATTERN.fullmatch(result_id) is not None
        and (parent is None or (isinstance(parent, str) and ID_PATTERN.fullmatch(parent) is not None))
        and isinstance(task, str)
        and task in TASKS
        and isinstance(inputs, dict)
        and all(name in INPUT_NAMES and isinstance(value, str) for name, value in inputs.items())
    )


def download_path(entry: Entry | None, store: ResultStore, *, owner: str = DEFAULT_OWNER) -> str | None:
    """The file a DownloadButton (or the gallery) offers for an entry of `owner`'s: their link to
    it (ResultStore.link); None when the entry is not theirs or the studio keeps no image for it."""
    if not entry_is_owned(entry, store, owner=owner):
        return None
    path = store.link(entry["id"], owner=owner)
    return str(path) if path is not None else None


def add_to_history(history: list[Entry] | None, entries: list[Entry], limit: int = HISTORY_LIMIT) -> list[Entry]:
    """Newest first, at most `limit` entries."""
    return [*entries, *(history or [])][:limit]


def valid_history(history: Any, store: ResultStore, *, owner: str = DEFAULT_OWNER) -> list[Entry]:
    """The entries that are well-formed, signed for `owner`, and whose images the store still
    keeps for them.

    The history comes back from the browser, so it is checked like any other input. Only the first HISTORY_LIMIT entries are looked at (the studio never writes more), so a
    forged history of any length costs no more than a full one; each valid entry comes back
    with only the keys an entry has, its parameters at most as large as a PNG's may be.
    """
    if not isinstance(history, list):
        return []
    entries = (_valid_entry(entry, store, owner) for entry in history[:HISTORY_LIMIT])
    return [entry for entry in entries if entry is not None]


def _valid_entry(entry: Any, store: ResultStore, owner: str) -> Entry | None:
    if not isinstance(entry, dict):
        return None
    parameters = entry.get("parameters")
    if not (
        isinstance(parameters, dict)
        and json_within(parameters, max_chars=MAX_PARAMETERS_BYTES, max_depth=MAX_PARAMETERS_DEPTH)
        and entry_is_owned(entry, store, owner=owner)
    ):
        return None
    return {"id": entry["id"], "task": entry["task"], "parameters": parameters, "parent": entry.get("parent"),
            "inputs": entry.get("inputs", {}), signing.SIGNATURE_FIELD: entry[signing.SIGNATURE_FIELD]}


def caption(entry: Entry, made_from: str | None = None) -> str:
    """"Erase · seed 4 · from #2 · a prompt…": the tab, the seed, what it was made from (when
    given, see `history_items`) and the prompt's start."""
    parameters = entry["parameters"]
    prompt = parameters.get("prompt")
    prompt = prompt if isinstance(prompt, str) else ""
    if len(prompt) > CAPTION_PROMPT_CHARS:
        prompt = prompt[: CAPTION_PROMPT_CHARS - 1] + "…"
    parts = [_step_name(entry), f"from {made_from}" if made_from else "", prompt]
    return " · ".join(part for part in parts if part)


def _step_name(entry: Entry) -> str:
    seed = effective_seed(entry)
    return f"{TASKS[entry['task']].title} · seed {'?' if seed is None else seed}"


def gallery_items(entries: list[Entry], store: ResultStore, *, owner: str = DEFAULT_OWNER) -> list[tuple[str, str]]:
    """(image path, caption) pairs, as gr.Gallery shows them: `owner`'s links to the images of
    their entries (others, and entries without an image, left out)."""
    paths = [(download_path(entry, store, owner=owner), entry) for entry in entries]
    return [(path, caption(entry)) for path, entry in paths if path is not None]


# --- lineage: how the history shows chains ----------------------------------------------------------
# A history (newest first) numbers its results from the oldest, #1; a result names its parent by
# that number when the parent is an older entry of the history ("from #2"), else "an earlier result".


def parent_positions(entries: list[Entry]) -> list[int | None]:
    """For each entry (newest first), the position in `entries` of the result it was made from:
    the nearest older entry of that id; None when it was made fresh or its parent is not there."""
    positions: list[int | None] = []
    for index, entry in enumerate(entries):
        parent = entry.get("parent")
        older = (later for later in range(index + 1, len(entries)) if entries[later]["id"] == parent)
        positions.append(next(older, None) if parent is not None else None)
    return positions


def history_items(entries: list[Entry], store: ResultStore, *, owner: str = DEFAULT_OWNER) -> list[tuple[str, str]]:
    """The history gallery's (image link, caption) pairs: as `gallery_items`, each caption with
    its number and its parent's ("#3 Restyle · seed 7 · from #2 · ..."), so chains and branches
    read in the captions. Every entry of a valid history has its link (`valid_history`)."""
    parents, count = parent_positions(entries), len(entries)
    items = []
    for index, (entry, parent) in enumerate(zip(entries, parents)):
        path = download_path(entry, store, owner=owner)
        if path is None:
            continue
        made_from = f"#{count - parent}" if parent is not None else ("an earlier result" if entry.get("parent") else None)
        items.append((path, f"#{count - index} {caption(entry, made_from)}"))
    return items


def chains_markdown(entries: list[Entry]) -> str:
    """The history's chains as a tree (Markdown), oldest first: each result under the one it was
    made from, two under one where the designer went back and branched. Results neither made from
    another nor sent on are left out; "" when there is no chain. Only tab names, numbers and seeds
    are shown (nothing the designer typed)."""
    parents, count = parent_positions(entries), len(entries)
    children: dict[int, list[int]] = {}
    for index in reversed(range(count)):  # oldest first
        if parents[index] is not None:
            children.setdefault(parents[index], []).append(index)
    roots = [index for index in reversed(range(count)) if parents[index] is None and index in children]
    if not roots:
        return ""
    lines: list[str] = []

    def draw(index: int, lead: str, branch: str) -> None:
        lines.append(f"{lead}{branch}#{count - index} {_step_name(entries[index])}")
        below = children.get(index, [])
        inner = lead + ("" if not branch else "   " if branch == "└─ " else "│  ")
        for number, child in enumerate(below):
            draw(child, inner, "└─ " if number == len(below) - 1 else "├─ ")

    for root in roots:
        draw(root, "", "")
    return "**Chains** (each result under the one it was made from):\n```text\n" + "\n".join(lines) + "\n```"


def restored_values(task: Task, parameters: dict[str, Any]) -> dict[str, Any]:
    """Control values that make the same image again, for the controls the parameters cover."""
    return {
        control.name: control.restore(parameters[control.name])
        for control in task.controls
        if control.name in parameters
    }


def vary_values(task: Task, parameters: dict[str, Any], pick_seed: Callable[[], int]) -> dict[str, Any]:
    """The controls that make a variation of a result: its own values (seed included) with a new
    variation seed from `pick_seed` at VARY_STRENGTH. A result that is itself a variation is varied
    around its seed's image: variations do not nest."""
    return {**restored_values(task, parameters), "variation_seed": pick_seed(), "variation_strength": VARY_STRENGTH}


def restored_inputs(entry: Entry, store: ResultStore, *, owner: str = DEFAULT_OWNER) -> dict[str, Image.Image]:
    """The input images of an entry of `owner`'s still in the store, by name ("image", "mask")."""
    if not entry_is_owned(entry, store, owner=owner):
        return {}
    images = {name: store.open(result_id, owner=owner) for name, result_id in (entry.get("inputs") or {}).items()}
    return {name: image for name, image in images.items() if image is not None}


def result_image(entry: Entry | None, store: ResultStore, *, owner: str = DEFAULT_OWNER) -> Image.Image | None:
    """The image of an entry of `owner`'s (what "Send to" sends on); None when it is not theirs."""
    return store.open(entry["id"], owner=owner) if entry_is_owned(entry, store, owner=owner) else None


def before_after(entry: Entry, store: ResultStore, *, owner: str = DEFAULT_OWNER) -> tuple[str, str] | None:
    """(input image link, result link) of an entry of `owner`'s to compare, while the store keeps
    both; None otherwise."""
    after = download_path(entry, store, owner=owner)
    if after is None:
        return None
    before = store.link((entry.get("inputs") or {}).get("image"), owner=owner)
    return (str(before), after) if before is not None else None


def effective_seed(entry: Entry) -> int | None:
    seed = entry["parameters"].get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def random_weights(entries: list[Entry]) -> str | None:
    """The kind of random weights (sdserve RANDOM_KINDS) a result was made with, if any: its
    images are noise, and the page says so."""
    kinds = {entry["parameters"].get("weights") for entry in entries}
    return next((kind for kind in RANDOM_KINDS if kind in kinds), None)
