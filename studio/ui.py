"""The components of one task tab, built from its Task data; app.py lays the tabs out and wires them."""

from __future__ import annotations

import base64
import types
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from gradio import processing_utils

from studio.errors import StudioError
from studio.masks import BRUSH_OPACITY, BRUSH_RGB
from studio.session import MAX_INPUT_SIDE, check_upload
from studio.tasks import TASKS, Control, Task

# Every result can be sent on to these tabs (the ones that take an image).
SEND_TARGETS = tuple(name for name, task in TASKS.items() if task.takes_image)
DEFAULT_BRUSH_SIZE = 24  # px, in the image's own pixels
# Gradio 6.31's editor places a layer that comes with its value (a restored mask, the example's)
# centred on the canvas size it was built with, not on the image: it lines up only on images of
# this size, the sample's and the default generation size.
EDITOR_CANVAS_SIZE = (512, 512)
# What Gradio writes an image put into an input as (its default, WebP, is lossy): a result sent
# on is the job's input as it was made, so its lineage holds and a replay feeds the same pixels.
LOSSLESS = "png"


@dataclass
class TaskPanel:
    """What one tab holds; the components are created inside the tab by `task_panel`."""

    task: Task
    controls: dict[str, gr.components.Component]
    run: gr.Button
    gallery: gr.Gallery
    seed_used: gr.Textbox
    reuse_seed: gr.Button
    download: gr.DownloadButton
    send: dict[str, gr.Button]
    parameters: gr.JSON
    results: gr.State  # the entries the gallery shows
    current: gr.State  # the entry picked in the gallery: what is downloaded and sent on
    source: gr.Image | gr.ImageEditor | None = None  # the input image; the Erase tab's is the editor
    brush_size: gr.Slider | None = None
    mask_preview: gr.Image | None = None
    before_after: gr.ImageSlider | None = None  # the current result beside its input (tabs that take one)
    # The API endpoint's image parameters by name. An editor value is awkward over the API, so
    # Erase takes a plain image there, and a mask (the preview component, which shows the same).
    api_images: dict[str, gr.Image] = field(default_factory=dict)
    # An edit tool's tab (Erase, Extend): what will be sent and pasted back, shown before sending.
    edit_preview: gr.Image | None = None
    vary: gr.Button | None = None  # a tab with variation arguments (Generate): vary the current result
    export_chain: gr.Button | None = None  # the current result's chain as a zip (app.py's export)
    # A tab that takes an image: the id of the result whose image was put into it (Send to, a history
    # entry restored), so that what it makes from that image records it as its parent.
    sent: gr.State | None = None

    @property
    def setting_controls(self) -> list[gr.components.Component]:
        """The controls of the tab's studio-side settings (an edit tool's), in order."""
        return [self.controls[name] for name in self.task.setting_names]

    @property
    def source_outputs(self) -> list[gr.components.Component]:
        """The tab's input image components (none for Generate)."""
        return [component for component in (self.source, self.mask_preview) if component is not None]

    @property
    def current_outputs(self) -> list[gr.components.Component]:
        """What picking a result in this tab updates."""
        compare = [self.before_after] if self.before_after is not None else []
        return [self.current, self.parameters, self.seed_used, self.download, *compare]

    @property
    def result_outputs(self) -> list[gr.components.Component]:
        """What showing results in this tab updates."""
        return [self.gallery, self.results, *self.current_outputs]

    @property
    def restore_outputs(self) -> list[gr.components.Component]:
        """What restoring a result into this tab updates."""
        sent = [self.sent] if self.sent is not None else []
        return [*self.source_outputs, *sent, *self.controls.values(), *self.result_outputs]


def brush(size: int) -> gr.Brush:
    red, green, blue = BRUSH_RGB
    return gr.Brush(default_size=int(size), colors=[(f"rgb({red}, {green}, {blue})", BRUSH_OPACITY)], color_mode="fixed")


def task_panel(task: Task, starting_values: dict[str, Any] | None = None) -> TaskPanel:
    """The tab's components, rendered in the current Blocks context (inside its gr.Tab).

    `starting_values` replace the controls' defaults where given (see TINY_WEIGHTS_START).
    """
    name = task.name
    start = {**task.defaults(), **(starting_values or {})}
    settings = set(task.setting_names)
    gr.Markdown(task.summary)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            source, brush_size, mask_preview, api_images = _image_inputs(task)
            controls = {
                control.name: control_widget(control, start[control.name], f"{name}-{control.name}")
                for control in task.controls
                if control.main and control.name not in settings
            }
            edit_preview = None
            if task.tool is not None:
                with gr.Accordion(task.tool.settings_title, open=True):
                    with gr.Row():
                        controls.update(
                            (control.name, control_widget(control, start[control.name], f"{name}-{control.name}"))
                            for control in task.controls
                            if control.name in settings
                        )
                    edit_preview = gr.Image(
                        label="Preview: the box sent (outlined) and what is repainted (tinted); "
                              "the rest stays exactly as it is",
                        type="pil", interactive=False, height=240, elem_id=f"{name}-edit-preview",
                    )
            with gr.Accordion("Sampling", open=True):
                with gr.Row():
                    controls.update(
                        (control.name, control_widget(control, start[control.name], f"{name}-{control.name}"))
                        for control in task.controls
                        if not control.main and control.name not in settings
                    )
            run = gr.Button(task.title, variant="primary", elem_id=f"{name}-run")
        with gr.Column(scale=1):
            gallery = gr.Gallery(
                label=f"{task.title} results", columns=2, fit_columns=False, height=420, object_fit="contain",
                interactive=False, elem_id=f"{name}-results",
            )
            before_after = gr.ImageSlider(
                label="Before / after: drag the handle to compare the result with its input", type="filepath",
                interactive=False, height=360, elem_id=f"{name}-before-after",
            ) if task.takes_image else None
            with gr.Row():
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id=f"{name}-seed-used")
                reuse_seed = gr.Button("Reuse this seed", size="sm", elem_id=f"{name}-reuse-seed")
                vary = None
                if "variation_seed" in controls:
                    vary = gr.Button("Vary", size="sm", elem_id=f"{name}-vary")
                download = gr.DownloadButton(
                    "Download PNG", interactive=False, size="sm", elem_id=f"{name}-download"
                )
                export_chain = gr.Button("Export chain", size="sm", elem_id=f"{name}-export-chain")
            with gr.Row():
                send = {
                    target: gr.Button(f"Send to {TASKS[target].title}", size="sm", elem_id=f"{name}-send-{target}")
                    for target in SEND_TARGETS
                }
            with gr.Accordion("Parameters", open=False):
                parameters = gr.JSON(label="Parameters", elem_id=f"{name}-parameters")
    return TaskPanel(
        task=task, controls=controls, run=run, gallery=gallery, seed_used=seed_used, reuse_seed=reuse_seed,
        download=download, send=send, parameters=parameters, results=gr.State([]), current=gr.State(None),
        source=source, brush_size=brush_size, mask_preview=mask_preview, api_images=api_images,
        edit_preview=edit_preview, vary=vary,
        before_after=before_after, export_chain=export_chain, sent=gr.State(None) if task.takes_image else None,
    )


def _image_inputs(task: Task):
    """(source, brush size, mask preview, API image parameters) of a task; Nones where it has none."""
    if not task.takes_image:
        return None, None, None, {}
    limit = f"at most {task.max_image_side} px a side"
    if not task.takes_mask:
        image = _bounded(task, gr.Image(
            label=f"Input image ({limit})", type="pil", image_mode="RGB", sources=("upload", "clipboard"),
            height=360, elem_id=f"{task.name}-image",
            format=LOSSLESS,  # a result sent here comes back to the job pixel for pixel
        ))
        return image, None, None, {"image": image}
    editor = _bounded(task, gr.ImageEditor(
        label=f"Image: paint over what should go ({limit})",
        type="pil", image_mode="RGBA", format=LOSSLESS, sources=("upload", "clipboard"),
        # No crop or resize: the mask must stay aligned with the image it was painted on.
        transforms=(), layers=False, brush=brush(DEFAULT_BRUSH_SIZE), eraser=gr.Eraser(default_size=DEFAULT_BRUSH_SIZE),
        canvas_size=EDITOR_CANVAS_SIZE, height=420, elem_id=f"{task.name}-editor",
    ))
    with gr.Row():
        brush_size = gr.Slider(1, 128, value=DEFAULT_BRUSH_SIZE, step=1, label="Brush size (px)", elem_id=f"{task.name}-brush-size")
        mask_preview = _bounded(task, gr.Image(
            label="Mask (white = replace)", type="pil", image_mode="L", interactive=False, height=160,
            elem_id=f"{task.name}-mask",
        ))
    api_image = _bounded(task, gr.Image(label="Image", type="pil", image_mode="RGB", visible=False))
    return editor, brush_size, mask_preview, {"image": api_image, "mask": mask_preview}


def control_widget(control: Control, value: Any, elem_id: str) -> gr.components.Component:
    common = {"value": value, "label": control.label, "info": control.info, "elem_id": elem_id}
    if control.widget == "text":
        return gr.Textbox(lines=2 if control.name == "prompt" else 1, **common)
    if control.widget == "slider":
        return gr.Slider(control.minimum, control.maximum, step=control.step, **common)
    if control.widget == "dropdown":
        return gr.Dropdown(list(control.choices), **common)
    if control.widget == "number":
        return gr.Number(precision=0, minimum=control.minimum, maximum=control.maximum, **common)
    if control.widget == "checkbox":
        return gr.Checkbox(**common)
    raise ValueError(f"unknown widget {control.widget!r} for {control.name}")


# --- upload limits ---------------------------------------------------------------------------
# Gradio decodes an uploaded image before a handler sees it. A bounded image input first reads
# the upload's header (studio.session.check_upload), so an image over its tab's limit, or a small
# file claiming to be huge, is refused before a pixel is decoded. The check is bound to the
# component instance, not a subclass: Gradio writes a .pyi file beside the module of every
# component class it sees, and a per-session copy of the component keeps the check.


def bounded_upload(component: Any, max_side: int = MAX_INPUT_SIDE, title: str = "The studio") -> Any:
    """`component` (a gr.Image or gr.ImageEditor) refusing an upload over `max_side` px a side."""
    component.max_upload_side, component.upload_title = max_side, title
    if isinstance(component, gr.ImageEditor):  # the background, each layer and the composite
        component.convert_and_format_image = types.MethodType(_checked_image_file, component)
    else:
        component.preprocess = types.MethodType(_checked_preprocess, component)
    return component


def _bounded(task: Task, component: Any) -> Any:
    return bounded_upload(component, task.max_image_side or MAX_INPUT_SIDE, task.title)


def _checked_preprocess(self: gr.Image, payload: Any) -> Any:
    if payload is not None:
        _check_upload(payload, self.max_upload_side, self.upload_title)
    return type(self).preprocess(self, payload)


def _checked_image_file(self: gr.ImageEditor, file: Any, flatten_on_white: bool = False) -> Any:
    if file is not None:
        _check_upload(file, self.max_upload_side, self.upload_title)
    return type(self).convert_and_format_image(self, file, flatten_on_white=flatten_on_white)


def _check_upload(payload: Any, max_side: int, title: str) -> None:
    """A gr.Error (shown to the designer) when an uploaded image is over `max_side` px a side."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        source: Any = bytes(payload)
    elif getattr(payload, "path", None):
        source = payload.path
    elif str(getattr(payload, "url", None) or "").startswith("data:"):
        source = base64.b64decode(processing_utils.extract_base64_data(payload.url))
    else:
        return  # nothing here to decode (Gradio itself refuses it)
    try:
        check_upload(source, max_side, title)
    except StudioError as error:
        raise gr.Error(str(error), print_exception=False) from None
