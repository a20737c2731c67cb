"""Loading a diffusers pipeline for a model, and running one batched call on it."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .budget import WorkBudget, megapixels
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
    """from_pretrained on a local folder: fp16 on CUDA, fp32 on the CPU.

    Safetensors only: a checkpoint comes from an archive anyone with write access to the model
    store may have made, and a pickled `.bin` runs code when loaded, so a component that has no
    `.safetensors` file is refused (diffusers and transformers raise OSError naming the file)."""
    device = torch.device(device)
    pipeline_class = getattr(diffusers, MODELS[model].pipeline_class)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = pipeline_class.from_pretrained(
        checkpoint_dir, dtype=dtype, variant=checkpoint_variant(checkpoint_dir), use_safetensors=True
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
    variation_seed: int | None = None  # set for a variation (variation_strength > 0)


class CallStopped(Exception):
    """A call stopped at its deadline, between two denoising steps."""

    def __init__(self, steps_done: int, steps_total: int):
        super().__init__(f"stopped after step {steps_done} of {steps_total}")
        self.steps_done, self.steps_total = steps_done, steps_total


def run_call(loaded: LoadedPipeline, rows: list[ImageRow], deadline: float | None = None) -> list[Image.Image]:
    """One pipeline call for rows that share a batch key; one image back per row.

    Every row has its own CPU generator, so a seed gives the same latents whether the
    row runs alone or beside others, on the CPU or on a GPU. When it cannot end by
    `deadline` (a time.monotonic() value) it stops at a step with CallStopped: nobody would
    wait for its answer. Its step times are recorded in the model's speed estimate.
    """
    first = rows[0].request
    args = first.args
    spec = first.spec
    pipe = loaded.pipe
    pipe.scheduler = make_scheduler(args["scheduler"], loaded.default_scheduler)
    generators = [torch.Generator("cpu").manual_seed(row.seed) for row in rows]
    call: dict[str, Any] = {
        "prompt": [row.request.prompt for row in rows],
        "negative_prompt": [row.request.negative_prompt for row in rows],
        "generator": generators,
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
    if any(row.variation_seed is not None for row in rows):
        call["latents"] = variation_latents(pipe, rows, generators, first.size)
    image_megapixels = sum(megapixels(row.request.size) for row in rows)
    step_ends: list[float] = []
    call.update(_step_callback(loaded.step_end_callbacks, step_ends, deadline, first.steps))
    started = time.monotonic()
    try:
        with torch.inference_mode():
            return pipe(**call).images
    finally:  # a stopped call still tells the speed
        loaded.budget.record(image_megapixels, step_ends, started, time.monotonic())


def variation_latents(pipe: Any, rows: list[ImageRow], generators: list[torch.Generator],
                      size: tuple[int, int]) -> torch.Tensor:
    """The initial latents of a text-to-image call with variations, one row at a time.

    Each row's seed noise is drawn from the row's own generator exactly as the pipeline draws
    it (same shape, dtype and CPU generator), so the generator is left in the same state for the
    scheduler's later draws and a row at strength 0 is the seed's own image. A variation's noise
    comes from its own generator and is mixed in spherically: the mix keeps the norm that the
    denoiser expects of Gaussian noise, where a straight average would shrink it.
    """
    width, height = size
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    dtype = pipe.text_encoder.dtype
    latents = []
    for row, generator in zip(rows, generators):
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
        if row.variation_seed is not None:
            variation = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(row.variation_seed),
                                     device=torch.device("cpu"), dtype=dtype)
            noise = slerp(row.request.args["variation_strength"], noise, variation)
        latents.append(noise)
    return torch.cat(latents)


def slerp(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `start` (t = 0, returned as it is) to `end` (t = 1, likewise)."""
    if t <= 0:
        return start
    if t >= 1:
        return end
    a, b = start.double(), end.double()
    cosine = torch.clamp((a * b).sum() / (a.norm() * b.norm()), -1.0, 1.0)
    if cosine.abs() > 0.9995:  # nearly parallel: the straight line is the arc
        return ((1 - t) * a + t * b).to(start.dtype)
    theta = torch.acos(cosine)
    mixed = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return mixed.to(start.dtype)


def _step_callback(step_end_callbacks: bool, step_ends: list[float], deadline: float | None,
                   total: int, *, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Step-callback arguments that note when each step ends (the model's speed) and raise
    CallStopped once the call cannot end by `deadline`: the deadline has passed, or another step
    as long as the last one would end past it. Stopping then, not a step later, keeps a call of
    long steps (large images on a slow device) from running a whole step past the deadline.

    Raising (rather than diffusers' `interrupt`) also skips the VAE decode of an unwanted result.
    The upscaler has only the older `callback(step, timestep, latents)` form. `clock` is what
    `deadline` is read against (tests pass their own).
    """
    def check(step: int) -> None:
        now = clock()
        last_step_s = now - step_ends[-1] if step_ends else 0.0
        step_ends.append(now)
        if deadline is None:
            return
        another_step_is_due = step + 1 < total
        if now > deadline or (another_step_is_due and now + last_step_s > deadline):
            # PNDM runs one step more than asked for: the count shown stays within what was asked.
            raise CallStopped(min(step + 1, total), total)

    if step_end_callbacks:
        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            check(step)
            return tensors

        return {"callback_on_step_end": on_step_end}
    return {"callback": lambda step, timestep, latents: check(step), "callback_steps": 1}
