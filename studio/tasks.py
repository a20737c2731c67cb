"""The studio's tabs, derived from the model table (sdserve.catalog): one Task per model (and per
edit tool of studio.edits), and `Task.check`, the one check of a job's inputs.

A tab's controls are the model's prompt inputs and its generation arguments, with the table's
labels, help, ranges and defaults. Every way into a job goes through `Task.check`: the tab's
button, its named API endpoint and StudioClient's methods. Each value is checked there once, by
the same `Argument.check` the server uses (one rule per input, in the same words), the image and
the mask once, and the edit settings are told from the model's arguments once; what comes out
(`JobInputs`) is planned (studio.planning) and sent without being checked again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from sdserve.catalog import MASK_THRESHOLD, MAX_PROMPT_CHARS, MIN_IMAGE_SIDE, MODELS, ModelSpec
from sdserve.errors import RequestError
from sdserve.params import Argument

from studio.edits import EDIT_TOOLS, EditTool, plan_edit
from studio.errors import StudioError

TEXT_CONTROLS = ("prompt", "negative_prompt")


@dataclass(frozen=True)
class Control:
    """One input of a tab as the studio shows it: a text box, a slider, a list or a number."""

    name: str  # the generation argument's or studio-side setting's name (or "prompt" / "negative_prompt")
    label: str
    widget: str  # "text", or the argument's widget: "slider", "dropdown", "number", "checkbox"
    default: Any
    info: str | None = None
    argument: Argument | None = None  # None for the text inputs
    # A text input's longest value: the server's (MAX_PROMPT_CHARS), refused here before planning.
    max_chars: int | None = None

    @property
    def minimum(self) -> float | None:
        return self.argument.minimum if self.argument else None

    @property
    def maximum(self) -> float | None:
        return self.argument.maximum if self.argument else None

    @property
    def step(self) -> float | None:
        return self.argument.step if self.argument else None

    @property
    def choices(self) -> tuple[str, ...]:
        return self.argument.choices if self.argument else ()

    @property
    def main(self) -> bool:
        """Shown beside the prompts (the prompts themselves, and the arguments the table marks so)."""
        return self.argument.main if self.argument else True

    @classmethod
    def for_argument(cls, argument: Argument) -> Control:
        return cls(argument.name, argument.label, argument.widget, argument.default, argument.help or None, argument)

    def check(self, value: Any) -> Any:
        """`value` as the endpoint wants it, or a StudioError naming the control and its limits:
        the table's `Argument.check` (sdserve.params has the rule); a text's None is empty, and a
        text is at most `max_chars` long (the server's limit, so nothing it would refuse is sent)."""
        if self.argument is None:
            text = self.default if value is None else str(value)
            if self.max_chars is not None and len(text) > self.max_chars:
                raise StudioError(f"{self.label}: at most {self.max_chars:,} characters; got {len(text):,}.")
            return text
        try:
            return self.argument.check(value, field=self.label)
        except RequestError as error:
            raise StudioError(f"{error}.") from None

    def restore(self, value: Any) -> Any:
        """A value read back from a PNG or the browser's storage: the default where it is unusable."""
        try:
            return self.check(value)
        except StudioError:
            return self.default


@dataclass(frozen=True)
class JobInputs:
    """A job's inputs, each checked once (`Task.check`): what studio.planning plans."""

    task: Task
    prompt: str
    negative_prompt: str
    gen_args: dict[str, Any]  # the model's arguments that were given, with their proper types
    settings: dict[str, Any] = field(default_factory=dict)  # an edit tool's settings, every one
    image: Image.Image | None = None  # RGB, within the tab's limits (for a task that takes one)
    mask: Image.Image | None = None  # L, the image's size, painted (for a task that takes one)


@dataclass(frozen=True)
class Task:
    """One tab of the studio and one API endpoint: `name` is both, and the StudioClient method.

    A model's own task, or an edit tool of studio.edits on it (Erase, Extend): then the tool names
    the tab and adds its studio-side settings to the controls, after the model's arguments.
    """

    spec: ModelSpec
    controls: tuple[Control, ...]
    tool: EditTool | None = None

    @classmethod
    def for_model(cls, spec: ModelSpec, tool: EditTool | None = None) -> Task:
        text = (
            Control("prompt", spec.prompt_label, "text", "", spec.prompt_help or None, max_chars=MAX_PROMPT_CHARS),
            Control("negative_prompt", "Negative prompt", "text", "", "What to steer away from.",
                    max_chars=MAX_PROMPT_CHARS),
        )
        settings = tool.settings if tool is not None else ()
        return cls(spec, (*text, *map(Control.for_argument, (*spec.arguments, *settings))), tool)

    name = property(lambda self: self.tool.name if self.tool else self.spec.task)
    title = property(lambda self: self.tool.title if self.tool else self.spec.title)
    model = property(lambda self: self.spec.name)
    summary = property(lambda self: self.tool.summary if self.tool else self.spec.summary)
    takes_image = property(lambda self: self.spec.takes_image)
    takes_mask = property(lambda self: self.tool.takes_mask if self.tool else self.spec.takes_mask)
    prompt_required = property(lambda self: self.spec.prompt_required)
    # The largest input the studio takes: a tiled model (the upscaler) takes more than one call does.
    max_image_side = property(lambda self: self.spec.max_input_side)

    @property
    def setting_names(self) -> tuple[str, ...]:
        """The studio-side settings among the controls (an edit tool's); the rest go to the endpoint."""
        return tuple(argument.name for argument in self.tool.settings) if self.tool else ()

    def defaults(self) -> dict[str, Any]:
        return {control.name: control.default for control in self.controls}

    def control(self, name: str) -> Control:
        return next(control for control in self.controls if control.name == name)

    def check(self, values: Mapping[str, Any], image: Image.Image | None = None,
              mask: Image.Image | None = None) -> JobInputs:
        """A job's inputs checked, or a StudioError saying what to change; nothing is sent.

        `values` by control name, as the tab's controls, its API endpoint and StudioClient's
        keywords give them: the prompts, the model's arguments (those given are sent, the endpoint
        fills in the rest) and an edit tool's settings (the defaults for those not given).
        """
        unknown = sorted(set(values) - {control.name for control in self.controls})
        if unknown:
            names = [control.name for control in self.controls if control.name not in TEXT_CONTROLS]
            raise StudioError(f"{self.name} takes no argument {unknown[0]!r}; it takes {', '.join(names)}.")
        checked = {name: self.control(name).check(value) for name, value in values.items()}
        prompt, negative_prompt = (checked.pop(name, "") for name in TEXT_CONTROLS)
        settings = {name: checked.pop(name, default) for name, default in (self.tool.defaults() if self.tool else {}).items()}
        if self.prompt_required and not prompt.strip():
            raise StudioError(f"Write a prompt: {self.title} needs one.")
        try:  # arguments fine alone may still be refused together (strength x steps < 1)
            self.spec.check_steps({**self.spec.defaults(), **checked})
        except RequestError as error:
            raise StudioError(f"{error}.") from None
        if self.takes_image:
            image = self._checked_image(image)
        mask = checked_mask(mask, image.size) if self.takes_mask else None
        return JobInputs(self, prompt, negative_prompt, checked, settings, image, mask)

    def preview(self, values: dict[str, Any], image: Image.Image | None,
                mask: Image.Image | None = None) -> Image.Image | None:
        """An edit tool's preview (studio.edits.EditPlan.preview) for the tab's current inputs and
        settings; None while there is nothing to show (no image or mask yet, a setting out of range)."""
        if self.tool is None or image is None:
            return None
        try:
            inputs = self.check(values, image, mask)
            return plan_edit(self.tool, inputs.image, inputs.mask, inputs.settings, self.max_image_side).preview()
        except StudioError:
            return None

    def _checked_image(self, image: Image.Image | None) -> Image.Image:
        if image is None:
            raise StudioError(f"{self.title} needs an input image: upload one, or send a result here from another tab.")
        width, height = image.size
        check_side(width, height, self.max_image_side, self.title)
        if min(width, height) < MIN_IMAGE_SIDE:
            raise StudioError(f"The image is {width}×{height} px; {self.title} needs at least {MIN_IMAGE_SIDE} px a side.")
        return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image is sent as it came


def check_side(width: int, height: int, max_side: int, title: str) -> None:
    """A StudioError when an image is over `max_side` px a side: for a job's input (Task.check), and
    for an upload from its header, before it is decoded (studio.session.check_upload)."""
    if max(width, height) > max_side:
        raise StudioError(
            f"The image is {width}×{height} px; {title} accepts at most {max_side} px a side. Make it smaller first."
        )


def checked_mask(mask: Image.Image | None, image_size: tuple[int, int]) -> Image.Image:
    """The mask as the endpoint takes it (white = replace), or a StudioError saying what is wrong."""
    if mask is None:
        raise StudioError("The mask is empty: paint over the area to replace.")
    mask = mask if mask.mode == "L" else mask.convert("L")
    if mask.size != image_size:
        raise StudioError(
            f"The mask is {mask.size[0]}×{mask.size[1]} px but the image is {image_size[0]}×{image_size[1]} px; "
            "they must be the same size."
        )
    if mask.getextrema()[1] < MASK_THRESHOLD:
        raise StudioError("The mask is empty: paint over the area to replace.")
    return mask


def _tasks() -> list[Task]:
    """Each model's task (Erase is an edit tool's, studio.edits), and after it the other edit tools
    on that model (Extend, after Erase)."""
    tasks = []
    for spec in MODELS.values():
        tasks.append(Task.for_model(spec, EDIT_TOOLS.get(spec.task)))
        tasks += [Task.for_model(spec, tool) for tool in EDIT_TOOLS.values() if tool.model == spec.name
                  and tool.name != spec.task]
    return tasks


TASKS: dict[str, Task] = {task.name: task for task in _tasks()}
# A model's own task: what a result of it restores into when its parameters name no edit tool.
TASK_BY_MODEL: dict[str, Task] = {task.model: task for task in TASKS.values() if task.name == task.spec.task}


def task_of(parameters: dict[str, Any]) -> Task | None:
    """The tab a result's parameters restore into: an edit tool's ("task") on its model, else the model's."""
    named = TASKS.get(parameters.get("task")) if isinstance(parameters.get("task"), str) else None
    if named is not None and named.model == parameters.get("model"):
        return named
    return TASK_BY_MODEL.get(str(parameters.get("model")))
