"""The four models the studio serves, as data: one entry per Triton model name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # Triton model name and archive stem (`sd_base` -> `sd_base.tar.gz`)
    task: str  # what the studio calls it
    hub_repo: str  # Hugging Face Hub repository of the real weights
    pipeline_class: str  # diffusers pipeline class, looked up by name at load time
    needs_image: bool
    needs_mask: bool


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="sd_base",
            task="text-to-image",
            hub_repo="stabilityai/stable-diffusion-2-1-base",
            pipeline_class="StableDiffusionPipeline",
            needs_image=False,
            needs_mask=False,
        ),
        ModelSpec(
            name="sd_depth",
            task="depth-to-image",
            hub_repo="stabilityai/stable-diffusion-2-depth",
            pipeline_class="StableDiffusionDepth2ImgPipeline",
            needs_image=True,
            needs_mask=False,
        ),
        ModelSpec(
            name="sd_inpaint",
            task="inpainting",
            hub_repo="stabilityai/stable-diffusion-2-inpainting",
            pipeline_class="StableDiffusionInpaintPipeline",
            needs_image=True,
            needs_mask=True,
        ),
        ModelSpec(
            name="sd_upscale",
            task="x4 upscaling",
            hub_repo="stabilityai/stable-diffusion-x4-upscaler",
            pipeline_class="StableDiffusionUpscalePipeline",
            needs_image=True,
            needs_mask=False,
        ),
    )
}

# Inside a model's version folder, where the diffusers pipeline folder lives.
CHECKPOINT_DIR = "checkpoint"
# Written beside model_index.json by serving/weights.py: {"kind": "tiny-random" | "hub", ...}.
WEIGHTS_MARKER = "weights.json"
