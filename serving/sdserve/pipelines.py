"""Loading a diffusers pipeline for a model, and running one batched call on it."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from .budget import WorkBudget, denoising_steps, megapixels
from .catalog import CALL_BUDGET_S, MODELS
from .checkpoint import checkpoint_variant, read_marker
from .params import SCHEDULERS
from .request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class LoadedPipeline:
    model: str
    pipe: diffusers.DiffusionPipeline
    device: torch.device
    weights_kind: str  # "tiny-random" for the demo weights, "hub" for the real ones
    attention: str  # which attention implementation runs, for the logs
    default_scheduler: Any  # the checkpoint's own; requests may swap in another per call
    budget: WorkBudget  # the time one call may take, and this model's measured speed
    # Whether the pipeline takes `callback_on_step_end`; the upscaler has only the older `callback`.
    step_end_callbacks: bool

    @property
    def max_prompt_tokens(self) -> int:
        return self.pipe.tokenizer.model_max_length


def load_pipeline(
    model: str, checkpoint_dir: Path, device: str | torch.device = "cpu", call_budget_s: float = CALL_BUDGET_S
) -> LoadedPipeline:
    """from_pretrained on a local folder: fp16 on CUDA, fp32 on the CPU."""
    device = torch.device(device)
    pipeline_class = getattr(diffusers, MODELS[model].pipeline_class)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = pipeline_class.from_pretrained(
        checkpoint_dir, dtype=dtype, variant=checkpoint_variant(checkpoint_dir)
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    attention = _enable_efficient_attention(pipe) if device.type == "cuda" else "sdpa"
    log.info("loaded %s from %s on %s (%s, %s attention)", model, checkpoint_dir, device, dtype, attention)
    return LoadedPipeline(
        model=model,
        pipe=pipe,
        device=device,
        weights_kind=read_marker(checkpoint_dir).get("kind", "unknown"),
        attention=attention,
        default_scheduler=pipe.scheduler,
        budget=WorkBudget(call_budget_s),
        step_end_callbacks="callback_on_step_end" in inspect.signature(pipe.__call__).parameters,
    )


def _enable_efficient_attention(pipe: diffusers.DiffusionPipeline) -> str:
    # xformers is optional and GPU-only; without it diffusers already uses PyTorch SDPA.
    if importlib.util.find_spec("xformers") is not None:
        pipe.enable_xformers_memory_efficient_attention()
        return "xformers"
    return "sdpa"


def scheduler_class_name(name: str, default: Any) -> str:
    return type(default).__name__ if SCHEDULERS[name] is None else SCHEDULERS[name][0]


def make_scheduler(name: str, default: Any) -> Any:
    """A fresh scheduler of the named kind, configured from the checkpoint's own."""
    overrides = {} if SCHEDULERS[name] is None else SCHEDULERS[name][1]
    return getattr(diffusers, scheduler_class_name(name, default)).from_config(default.config, **overrides)


@dataclass
class ImageRow:
    """One image to make: a request and which of its images this is."""

    request: GenerationRequest
    seed: int


class CallStopped(Exception):
    """A call stopped at its deadline, between two denoising steps."""

    def __init__(self, steps_done: int, steps_total: int):
        super().__init__(f"stopped after step {steps_done} of {steps_total}")
        self.steps_done, self.steps_total = steps_done, steps_total


def run_call(loaded: LoadedPipeline, rows: list[ImageRow], deadline: float | None = None) -> list[Image.Image]:
    """One pipeline call for rows that share a batch key; one image back per row.

    Every row has its own CPU generator, so a seed gives the same latents whether the
    row runs alone or beside others, on the CPU or on a GPU. Past `deadline` (a
    time.monotonic() value) the call stops at the next step with CallStopped: nobody waits
    for its answer any more. Its step times are recorded in the model's speed estimate.
    """
    first = rows[0].request
    args = first.args
    spec = first.spec
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(args["scheduler"], loaded.default_scheduler)
    call: dict[str, Any] = {
        "prompt": [row.request.prompt for row in rows],
        "negative_prompt": [row.request.negative_prompt for row in rows],
        "generator": [torch.Generator("cpu").manual_seed(row.seed) for row in rows],
        "num_images_per_prompt": 1,
        "output_type": "pil",
        **{argument.name: args[argument.name] for argument in spec.arguments if argument.pipeline},
    }
    if spec.takes_image:
        call["image"] = [row.request.image for row in rows]
    if spec.takes_mask:
        call["mask_image"] = [row.request.mask_image for row in rows]
    if spec.size_from_image:
        call["width"], call["height"] = first.size
    image_megapixels = sum(megapixels(row.request.size) for row in rows)
    step_ends: list[float] = []
    call.update(_step_callback(loaded.step_end_callbacks, step_ends, deadline, denoising_steps(args)))
    started = time.monotonic()
    try:
        with torch.inference_mode():
            return pipe(**call).images
    finally:  # a stopped call still tells the speed
        loaded.budget.record(image_megapixels, step_ends, started, time.monotonic())


def _step_callback(step_end_callbacks: bool, step_ends: list[float], deadline: float | None,
                   total: int) -> dict[str, Any]:
    """Step-callback arguments that note when each step ends (the model's speed) and raise
    CallStopped once `deadline` has passed.

    Raising (rather than diffusers' `interrupt`) also skips the VAE decode of an unwanted result.
    The upscaler has only the older `callback(step, timestep, latents)` form.
    """
    def check(step: int) -> None:
        step_ends.append(time.monotonic())
        if deadline is not None and step_ends[-1] > deadline:
            # PNDM runs one step more than asked for: the count shown stays within what was asked.
            raise CallStopped(min(step + 1, total), total)

    if step_end_callbacks:
        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            check(step)
            return tensors

        return {"callback_on_step_end": on_step_end}
    return {"callback": lambda step, timestep, latents: check(step), "callback_steps": 1}
