"""A session's results as plain data: history entries, what a result restores, what it carries on.

An entry is a small JSON object (the browser keeps the history, so it must stay small):

    {"id": "<store id of the PNG>", "task": "erase",
     "parameters": {...what the endpoint reported for this one image, its own seed included...},
     "inputs": {"image": "<store id>", "mask": "<store id>"}}     # the task's input images, if any
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from studio.client import GenerationResult
from studio.metadata import embed_parameters, image_to_png, read_parameters
from studio.store import ResultStore
from studio.tasks import TASK_BY_MODEL, TASKS, Task

HISTORY_LIMIT = 50
CAPTION_PROMPT_CHARS = 60

Entry = dict[str, Any]


def record_result(
    store: ResultStore, task: Task, result: GenerationResult, inputs: dict[str, Image.Image] | None = None
) -> list[Entry]:
    """Keep a result's PNGs (parameters embedded) and its inputs in the store; one entry per image."""
    input_ids = {name: store.save(image_to_png(image), f"{task.name}-{name}.png") for name, image in (inputs or {}).items()}
    entries = []
    for index, png in enumerate(result.png):
        # The endpoint embeds each image's own parameters; fall back to the result's with this image's seed.
        parameters = read_parameters(png) or {**result.parameters, "seed": _nth_seed(result, index)}
        png = embed_parameters(png, parameters)
        result_id = store.save(png, f"{task.name}-seed-{parameters.get('seed', 'unknown')}.png")
        entries.append({"id": result_id, "task": task.name, "parameters": parameters, "inputs": input_ids})
    return entries


def _nth_seed(result: GenerationResult, index: int) -> Any:
    seeds = result.seeds
    return seeds[index] if index < len(seeds) else seeds[0]


def entry_from_png(store: ResultStore, png: bytes) -> Entry | None:
    """An entry for a PNG made by the studio (dropped back into it); None without parameters."""
    parameters = read_parameters(png)
    task = TASK_BY_MODEL.get(str((parameters or {}).get("model")))
    if task is None:
        return None
    result_id = store.save(png, f"{task.name}-seed-{parameters.get('seed', 'unknown')}.png")
    return {"id": result_id, "task": task.name, "parameters": parameters, "inputs": {}}


def add_to_history(history: list[Entry] | None, entries: list[Entry], limit: int = HISTORY_LIMIT) -> list[Entry]:
    """Newest first, at most `limit` entries."""
    return [*entries, *(history or [])][:limit]


def valid_history(history: Any, store: ResultStore) -> list[Entry]:
    """The entries that are well-formed and whose images are still in the store.

    The history comes back from the browser, so it is checked like any other input.
    """
    if not isinstance(history, list):
        return []
    return [entry for entry in history if _is_valid_entry(entry, store)][:HISTORY_LIMIT]


def _is_valid_entry(entry: Any, store: ResultStore) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("task") in TASKS
        and isinstance(entry.get("parameters"), dict)
        and store.path(entry.get("id")) is not None
        and isinstance(entry.get("inputs", {}), dict)
    )


def caption(entry: Entry) -> str:
    parameters = entry["parameters"]
    prompt = str(parameters.get("prompt") or "")
    if len(prompt) > CAPTION_PROMPT_CHARS:
        prompt = prompt[: CAPTION_PROMPT_CHARS - 1] + "…"
    parts = [TASKS[entry["task"]].title, f"seed {parameters.get('seed', '?')}", prompt]
    return " · ".join(part for part in parts if part)


def gallery_items(entries: list[Entry], store: ResultStore) -> list[tuple[str, str]]:
    """(image path, caption) pairs, as gr.Gallery shows them."""
    return [(str(store.path(entry["id"])), caption(entry)) for entry in entries if store.path(entry["id"])]


def restored_values(task: Task, parameters: dict[str, Any]) -> dict[str, Any]:
    """Control values that make the same image again, for the controls the parameters cover."""
    return {
        control.name: control.restore(parameters[control.name])
        for control in task.controls
        if control.name in parameters
    }


def restored_inputs(entry: Entry, store: ResultStore) -> dict[str, Image.Image]:
    """The entry's input images still in the store, by name ("image", "mask")."""
    images = {name: store.open(result_id) for name, result_id in (entry.get("inputs") or {}).items()}
    return {name: image for name, image in images.items() if image is not None}


def effective_seed(entry: Entry) -> int | None:
    seed = entry["parameters"].get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def shows_tiny_weights(entries: list[Entry]) -> bool:
    """Whether any result was made with the demo's tiny random weights (its images are noise)."""
    return any(entry["parameters"].get("weights") == "tiny-random" for entry in entries)
