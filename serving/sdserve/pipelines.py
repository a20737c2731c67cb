"""Loading a diffusers pipeline for a model, and running one batched call on it."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from .catalog import MODELS
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

    @property
    def max_prompt_tokens(self) -> int:
        return self.pipe.tokenizer.model_max_length


def load_pipeline(model: str, checkpoint_dir: Path, device: str | torch.device = "cpu") -> LoadedPipeline:
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


def run_call(loaded: LoadedPipeline, rows: list[ImageRow]) -> list[Image.Image]:
    """One pipeline call for rows that share a batch key; one image back per row.

    Every row has its own CPU generator, so a seed gives the same latents whether the
    row runs alone or beside others, on the CPU or on a GPU.
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
    with torch.inference_mode():
        return pipe(**call).images
