"""Smoke test of the live endpoint: one call per model through the studio's client layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from deploy.aws import redact
from deploy.config import DeployConfig
from sdserve.catalog import MIN_IMAGE_SIDE, MODELS, ModelSpec

PROMPT = "a house under a blue sky, green hills and a tree"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def sample_image(size: int) -> Image.Image:
    """The studio's sample picture (assets/sample.png) at `size` x `size`."""
    with Image.open(ASSETS_DIR / "sample.png") as image:
        return image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def sample_mask(size: int) -> Image.Image:
    """Its mask (white over the tree), at `size` x `size`, hard-edged."""
    with Image.open(ASSETS_DIR / "sample_mask.png") as mask:
        return mask.convert("L").resize((size, size), Image.Resampling.NEAREST)


def sample_job(client: Any, spec: ModelSpec, size: int, **gen_args: Any) -> Any:
    """One call of `spec`'s model on the sample picture, making `size` x `size` images.

    The input is the sample at `size / output_scale` (the upscaler's input is a quarter of its
    output), with the sample mask where the model takes one; `client` is a StudioClient.
    """
    if not spec.takes_image:
        return client.run(spec.task, PROMPT, "", {"width": size, "height": size, **gen_args})
    side = max(MIN_IMAGE_SIDE, size // spec.output_scale)
    mask = sample_mask(side) if spec.takes_mask else None
    return client.run(spec.task, PROMPT, "", gen_args, image=sample_image(side), mask=mask)


def smoke_test(cfg: DeployConfig, out_dir: Path, *, steps: int, seed: int) -> bool:
    """True when every model answered; each image is written to `out_dir`."""
    from studio.client import StudioClient, StudioError  # the studio layer is only needed here

    client = StudioClient.for_sagemaker(cfg.endpoint_name, cfg.region)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    for model in cfg.models:
        try:
            result = sample_job(client, MODELS[model], 512, num_inference_steps=steps, seed=seed)
        except StudioError as error:
            print(redact(f"{model}: FAILED: {error}"))
            ok = False
            continue
        for index, image in enumerate(result.images):
            path = out_dir / f"{model}-{index}.png"
            image.save(path)
            print(f"{model}: {path} ({image.width}x{image.height}, parameters {result.parameters})")
    return ok
