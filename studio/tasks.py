"""The studio's tabs, derived from the model table (sdserve.catalog): one Task per model.

A tab's controls are the model's prompt inputs and its generation arguments, with the table's
labels, help, ranges and defaults; values are checked by the same `Argument.check` the server
uses, so a designer hears of a bad value before anything is sent, in the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image
from sdserve.catalog import MASK_THRESHOLD, MIN_IMAGE_SIDE, MODELS, ModelSpec
from sdserve.errors import RequestError
from sdserve.params import Argument

from studio.client import GenerationResult, StatusCallback, StudioClient, StudioError
from studio.edits import EDIT_TOOLS, EditTool, plan_edit
from studio.jobs import JobPlan, ResultCallback, max_input_side, plan_job
from studio.scheduler import Job


@dataclass(frozen=True)
class Control:
    """One input of a tab as the studio shows it: a text box, a slider, a list or a number."""

    name: str  # the generation argument's or studio-side setting's name (or "prompt" / "negative_prompt")
    label: str
    widget: str  # "text", or the argument's widget: "slider", "dropdown", "number", "checkbox"
    default: Any
    info: str | None = None
    argument: Argument | None = None  # None for the text inputs

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

    @classmethod
    def for_argument(cls, argument: Argument) -> Control:
        return cls(argument.name, argument.label, argument.widget, argument.default, argument.help or None, argument)

    def validate(self, value: Any) -> Any:
        """`value` as the endpoint wants it, or a StudioError naming the control and its limits.

        Sliders and number boxes hand over floats (50.0), which the endpoint refuses for an
        integer argument, so numbers are converted to the argument's type first; an emptied
        field (None) means the default.
        """
        if value is None:
            return self.default
        if self.argument is None:
            return str(value)
        kind = self.argument.kind
        if kind is bool:
            if value not in (True, False):  # 1 and 0 too: bool(value) would take any string as on
                raise StudioError(f"{self.label} must be on or off; got {value!r}.")
            value = bool(value)
        elif kind is not str:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise StudioError(f"{self.label} must be a number; got {value!r}.") from None
            if not math.isfinite(value):
                raise StudioError(f"{self.label} must be a finite number; got {value!r}.")
            if kind is int:
                value = int(round(value))
        else:
            value = str(value)
        try:
            return self.argument.check(value, field=self.label)
        except RequestError as error:
            raise StudioError(f"{error}.") from None

    def restore(self, value: Any) -> Any:
        """A value read back from a PNG or the browser's storage: the default where it is unusable."""
        try:
            return self.validate(value)
        except StudioError:
            return self.default


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
            Control("prompt", spec.prompt_label, "text", "", spec.prompt_help or None),
            Control("negative_prompt", "Negative prompt", "text", "", "What to steer away from."),
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
    max_image_side = property(lambda self: max_input_side(self.spec))

    @property
    def setting_names(self) -> tuple[str, ...]:
        """The studio-side settings among the controls (an edit tool's); the rest go to the endpoint."""
        return tuple(argument.name for argument in self.tool.settings) if self.tool else ()

    def defaults(self) -> dict[str, Any]:
        return {control.name: control.default for control in self.controls}

    def plan(self, values: dict[str, Any], image: Image.Image | None = None,
             mask: Image.Image | None = None) -> JobPlan:
        """Check the inputs and plan the job's calls (studio.jobs), sending nothing."""
        arguments = {control.name: control.validate(values.get(control.name, control.default)) for control in self.controls}
        prompt, negative_prompt = arguments.pop("prompt"), arguments.pop("negative_prompt")
        settings = {name: arguments.pop(name) for name in self.setting_names}
        if self.prompt_required and not prompt.strip():
            raise StudioError(f"Write a prompt: {self.title} needs one.")
        if self.takes_image:
            image = self.checked_image(image)
        if self.takes_mask:
            mask = checked_mask(mask, image.size)
        return plan_job(self.name, prompt, negative_prompt, image=image, mask=mask, gen_args=arguments,
                        settings=settings or None)

    def preview(self, values: dict[str, Any], image: Image.Image | None,
                mask: Image.Image | None = None) -> Image.Image | None:
        """An edit tool's preview (studio.edits.EditPlan.preview) for the tab's current inputs and
        settings; None while there is nothing to show (no image or mask yet, a setting out of range)."""
        if self.tool is None or image is None:
            return None
        try:
            settings = {name: self.control(name).validate(values.get(name)) for name in self.setting_names}
            return plan_edit(self.tool, self.checked_image(image), mask, settings, self.max_image_side).preview()
        except StudioError:
            return None

    def control(self, name: str) -> Control:
        return next(control for control in self.controls if control.name == name)

    def run(
        self,
        client: StudioClient,
        values: dict[str, Any],
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        on_status: StatusCallback | None = None,
        job: Job | None = None,
        on_result: ResultCallback | None = None,
    ) -> GenerationResult:
        """Plan and send a job (see `plan` and `send`)."""
        return self.send(client, self.plan(values, image, mask), on_status, job=job, on_result=on_result)

    def send(
        self,
        client: StudioClient,
        plan: JobPlan,
        on_status: StatusCallback | None = None,
        *,
        job: Job | None = None,
        on_result: ResultCallback | None = None,
    ) -> GenerationResult:
        """Run a planned job through the client layer: in `job`'s turn (its calls go through the
        studio's scheduler, and its cancellation stops unsent calls).

        Raises StudioError, or studio.jobs.PartialJobError carrying the images that were made.
        """
        notify = on_status or (lambda line: None)
        if plan.is_split:
            notify(plan.summary)
        if job is not None:
            job.wait_for_turn()
        result = client.run_job(
            plan, submit=job.submit if job else None, cancelled=job.cancelled if job else None,
            on_status=on_status, on_result=on_result,
        )
        return result.raise_for_errors()

    def checked_image(self, image: Image.Image | None) -> Image.Image:
        if image is None:
            raise StudioError(f"{self.title} needs an input image: upload one, or send a result here from another tab.")
        width, height = image.size
        limit = self.max_image_side
        if limit and max(width, height) > limit:
            raise StudioError(
                f"The image is {width}×{height} px; {self.title} accepts at most {limit} px a side. "
                "Make it smaller first."
            )
        if min(width, height) < MIN_IMAGE_SIDE:
            raise StudioError(f"The image is {width}×{height} px; {self.title} needs at least {MIN_IMAGE_SIDE} px a side.")
        return image.convert("RGB")


def checked_mask(mask: Image.Image | None, image_size: tuple[int, int]) -> Image.Image:
    """The mask as the endpoint takes it (white = replace), or a StudioError saying what is wrong."""
    if mask is None:
        raise StudioError("The mask is empty: paint over the area to replace.")
    mask = mask.convert("L")
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
