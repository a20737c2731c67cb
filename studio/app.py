"""The studio page: `build_app` lays out the four task tabs, the status line and the session
history, then wires the events, top to bottom.

What the events do lives in plain, separately tested functions (tasks, session, masks,
metadata); the handlers below only translate between those and the components.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from studio.client import StudioClient, StudioError
from studio.masks import editor_value, mask_from_editor
from studio.session import (
    Entry,
    add_to_history,
    effective_seed,
    entry_from_png,
    gallery_items,
    record_result,
    restored_inputs,
    restored_values,
    shows_tiny_weights,
    valid_history,
)
from studio.status import run_with_status
from studio.store import ResultStore
from studio.tasks import TASKS, Task
from studio.ui import EDITOR_CANVAS_SIZE, TaskPanel, brush, task_panel

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
HISTORY_STORAGE_KEY = "sd-studio-history"
# Calls in flight to the endpoint at once, for all tabs, API callers and users together; more
# would only queue on the endpoint, where they cannot be cancelled.
ENDPOINT_CONCURRENCY = 2
GENERIC_ERROR = "Something went wrong in the studio; the details are in its log."
TINY_WEIGHTS_BANNER = (
    "⚠️ **Demo weights:** the endpoint serves tiny random-weight models, so every image is noise. "
    "Real pictures need the real weights (`make real-weights`) or a SageMaker endpoint."
)
# On the demo's tiny weights (a CPU), the article's 512 px and 50 steps take minutes an image;
# the studio starts small instead, and says so.
TINY_WEIGHTS_START = {"width": 128, "height": 128, "num_inference_steps": 10}
TINY_WEIGHTS_START_NOTE = " The studio starts at 128 px and 10 steps, which a CPU makes in seconds."


def build_app(
    client_factory: Callable[[], StudioClient],
    *,
    store: ResultStore,
    tiny_weights: bool = False,
    endpoint: str | None = None,
    history_secret: str | None = None,
    assets_dir: Path = ASSETS_DIR,
) -> gr.Blocks:
    """The studio as a gr.Blocks; `client_factory` is called once, on the first request."""
    client = functools.cache(client_factory)
    # Results and samples are served from where they are, not copied into Gradio's cache.
    gr.set_static_paths([store.root, assets_dir])
    examples = json.loads((assets_dir / "prompts.json").read_text())

    with gr.Blocks(title="SD Studio", analytics_enabled=False) as demo:
        banner = gr.Markdown(
            TINY_WEIGHTS_BANNER + (TINY_WEIGHTS_START_NOTE if tiny_weights else ""),
            visible=tiny_weights, elem_id="tiny-weights-banner",
        )
        gr.Markdown(
            "# SD Studio\nGenerate an image, then send it on to restyle it, erase part of it or upscale it."
            + (f"\n\nEndpoint: `{endpoint}`" if endpoint else "")
        )
        with gr.Row(equal_height=True):
            status = gr.Markdown("Ready.", elem_id="status")
            cancel = gr.Button("Cancel", variant="stop", size="sm", scale=0, elem_id="cancel")
        history = gr.BrowserState([], storage_key=HISTORY_STORAGE_KEY, secret=history_secret)

        panels: dict[str, TaskPanel] = {}
        with gr.Tabs(selected="generate") as tabs:
            for task in TASKS.values():
                with gr.Tab(task.title, id=task.name, elem_id=f"tab-{task.name}"):
                    panels[task.name] = panel = task_panel(task, TINY_WEIGHTS_START if tiny_weights else None)
                    _examples(panel, examples.get(task.name, []), assets_dir)

        gr.Markdown("## Session history")
        history_gallery = gr.Gallery(
            label="Every result of this session, newest first: pick one to restore it in its tab",
            columns=8, fit_columns=False, height=240, allow_preview=False, interactive=False, elem_id="history",
        )
        png_drop = gr.File(
            label="Drop a PNG made by the studio here to restore its parameters",
            file_types=[".png"], type="binary", height=120, elem_id="png-drop",
        )

        # --- wiring ---------------------------------------------------------------------------

        def show_results(panel: TaskPanel, entries: list[Entry]) -> dict:
            return {panel.gallery: gallery_items(entries, store), panel.results: entries, **show_current(panel, entries[0])}

        def show_current(panel: TaskPanel, entry: Entry) -> dict:
            seed = effective_seed(entry)
            return {
                panel.current: entry,
                panel.parameters: entry["parameters"],
                panel.seed_used: "" if seed is None else str(seed),
                panel.download: gr.DownloadButton(value=str(store.path(entry["id"])), interactive=True),
            }

        def restore(entry: Entry) -> dict:
            """The entry's parameters and inputs back into its tab, shown there as the current result."""
            panel = panels[entry["task"]]
            values = restored_values(panel.task, entry["parameters"])
            updates = {panel.controls[name]: value for name, value in values.items()}
            inputs = restored_inputs(entry, store)
            message = f"Restored into {panel.task.title}: seed {effective_seed(entry)}."
            if panel.source is not None and "image" in inputs:
                source = _source_update(panel, inputs["image"], inputs.get("mask"))
                if "mask" in inputs and source[panel.mask_preview] is None:
                    message += " Paint the mask again: the editor shows masks only on 512×512 images."
                updates.update(source)
            return {
                tabs: gr.Tabs(selected=panel.task.name),
                status: message,
                **updates,
                **show_results(panel, [entry]),
            }

        def run_in_tab(panel: TaskPanel) -> Callable:
            task = panel.task

            def run(history_entries: list, source: Any = None, **values: Any):
                try:
                    image, mask = _source_images(task, source)
                    result = yield from run_with_status(
                        lambda on_status: task.run(client(), values, image, mask, on_status),
                        present=lambda line: {status: line},
                    )
                except Exception as error:
                    message = _designer_message(error)
                    yield {status: f"**Error:** {message}"}
                    raise gr.Error(message, print_exception=False) from None
                inputs = {name: value for name, value in (("image", image), ("mask", mask)) if value is not None}
                entries = record_result(store, task, result, inputs)
                history_entries = add_to_history(valid_history(history_entries, store), entries)
                yield {
                    status: f"**Done:** {task.title}, {_count(len(entries))} in {result.seconds:.1f} s.",
                    history: history_entries,
                    history_gallery: gallery_items(history_entries, store),
                    banner: gr.Markdown(visible=True) if shows_tiny_weights(entries) else gr.skip(),
                    **show_results(panel, entries),
                }

            return run

        def api_endpoint(task: Task) -> Callable:
            def call(image=None, mask=None, **values: Any) -> tuple[list, dict]:
                try:
                    result = task.run(client(), values, image, mask)
                except Exception as error:
                    raise gr.Error(_designer_message(error), print_exception=False) from None
                return gallery_items(record_result(store, task, result), store), result.parameters

            return call

        def send_to(target: TaskPanel) -> Callable:
            def send(entry: Entry | None) -> dict:
                image = store.open(entry["id"]) if entry else None
                if image is None:
                    gr.Warning("Nothing to send yet: make or pick a result first.")
                    return {}
                return {
                    tabs: gr.Tabs(selected=target.task.name),
                    status: f"Sent to {target.task.title}.",
                    target.controls["prompt"]: entry["parameters"].get("prompt", ""),
                    **_source_update(target, image),
                }

            return send

        def pick_result(panel: TaskPanel) -> Callable:
            def pick(results: list[Entry], selected: gr.SelectData) -> dict:
                return show_current(panel, results[selected.index])

            return pick

        def pick_from_history(history_entries: list, selected: gr.SelectData) -> dict:
            entries = valid_history(history_entries, store)
            return restore(entries[selected.index]) if selected.index < len(entries) else {}

        def open_png(png: bytes | None) -> dict:
            entry = entry_from_png(store, png) if png else None
            if entry is None:
                raise gr.Error("That PNG carries no studio parameters.", print_exception=False)
            return restore(entry)

        def show_history(history_entries: Any) -> dict:
            entries = valid_history(history_entries, store)
            return {
                history: entries,
                history_gallery: gallery_items(entries, store),
                banner: gr.Markdown(visible=True) if shows_tiny_weights(entries) else gr.skip(),
            }

        endpoint_limits = {"concurrency_id": "endpoint", "concurrency_limit": ENDPOINT_CONCURRENCY}
        ui_only = {"api_visibility": "private"}
        restore_outputs = [tabs, status, *(component for panel in panels.values() for component in panel.restore_outputs)]
        run_events = []
        for panel in panels.values():
            task = panel.task
            run_events.append(
                panel.run.click(
                    run_in_tab(panel),
                    inputs=[history, *([panel.source] if panel.source else [])],
                    inputs_kwargs=panel.controls,
                    outputs=[status, history, history_gallery, banner, *panel.result_outputs],
                    show_progress="minimal",
                    show_progress_on=[status, panel.gallery],  # not on every output: an error would be flagged on each
                    **endpoint_limits,
                    **ui_only,
                )
            )
            gr.on(
                triggers=[],  # an API endpoint only: the tab's button above is the UI's way in
                fn=api_endpoint(task),
                inputs_kwargs={**panel.api_images, **panel.controls},
                outputs=[panel.gallery, panel.parameters],
                api_name=task.name,
                api_description=_api_description(task),
                **endpoint_limits,
            )
            panel.gallery.select(
                pick_result(panel), inputs=panel.results, outputs=panel.current_outputs, **ui_only
            )
            panel.reuse_seed.click(
                lambda seed: int(seed) if seed and seed.isdigit() else gr.skip(),
                inputs=panel.seed_used, outputs=panel.controls["seed"], **ui_only,
            )
            for target_name, button in panel.send.items():
                target = panels[target_name]
                button.click(
                    send_to(target),
                    inputs=panel.current,
                    outputs=[tabs, status, target.controls["prompt"], *target.source_outputs],
                    **ui_only,
                )

        erase = panels["erase"]
        erase.source.change(
            lambda value: mask_from_editor(value)[1],
            inputs=erase.source, outputs=erase.mask_preview, show_progress="hidden", **ui_only,
        )
        erase.brush_size.change(
            lambda size: gr.ImageEditor(brush=brush(size), eraser=gr.Eraser(default_size=int(size))),
            inputs=erase.brush_size, outputs=erase.source, show_progress="hidden", **ui_only,
        )
        cancel.click(
            lambda: "Cancelled. A request already on the endpoint still finishes there; its result is dropped.",
            outputs=status, cancels=run_events, **ui_only,
        )
        history_gallery.select(pick_from_history, inputs=history, outputs=restore_outputs, **ui_only)
        png_drop.upload(open_png, inputs=png_drop, outputs=restore_outputs, **ui_only)
        demo.load(show_history, inputs=history, outputs=[history, history_gallery, banner], **ui_only)
    return demo


def _count(images: int) -> str:
    return "1 image" if images == 1 else f"{images} images"


def _source_images(task: Task, source: Any):
    """(image, mask) from a tab's input component value: the editor gives both."""
    if task.takes_mask:
        return mask_from_editor(source)
    return source, None


def _source_update(panel: TaskPanel, image: Image.Image, mask: Image.Image | None = None) -> dict:
    """Put an image (and for Erase its mask, painted on, where the editor can show it) into a tab's input."""
    if panel.mask_preview is None:
        return {panel.source: image}
    if image.size != EDITOR_CANVAS_SIZE:
        mask = None  # it would show up shifted (see EDITOR_CANVAS_SIZE); the designer paints it again
    return {panel.source: editor_value(image, mask), panel.mask_preview: mask}


def _examples(panel: TaskPanel, prompts: list[dict], assets_dir: Path) -> None:
    """The tab's examples: prompts from assets/prompts.json, on the sample image (and mask)."""
    if not prompts:
        return
    text = [panel.controls["prompt"], panel.controls["negative_prompt"]]
    rows = [[prompt["prompt"], prompt.get("negative_prompt", "")] for prompt in prompts]
    if panel.source is None:
        gr.Examples(rows, inputs=text, label="Example prompts", cache_examples=False)
        return
    sample: Any = str(assets_dir / "sample.png")
    if panel.mask_preview is not None:
        sample = editor_value(Image.open(sample).convert("RGB"), Image.open(assets_dir / "sample_mask.png"))
    gr.Examples([[sample, *row] for row in rows], inputs=[panel.source, *text], label="Examples", cache_examples=False)


def _api_description(task: Task) -> str:
    images = ""
    if task.takes_mask:
        images = " `image` is the picture; `mask` is white where to replace, black where to keep, same size."
    elif task.takes_image:
        images = f" `image` is at most {task.max_image_side} px a side."
    return (
        f"{task.summary}{images} Returns the images (PNG, with the generation parameters in a text chunk) "
        "and the parameters the endpoint used, the effective seed included; seed -1 picks a random one."
    )


def _designer_message(error: Exception) -> str:
    """A short message for the designer: the client layer's own, or a generic one (logged in full)."""
    if isinstance(error, StudioError):
        return str(error)
    log.error("studio request failed", exc_info=error)
    return GENERIC_ERROR
