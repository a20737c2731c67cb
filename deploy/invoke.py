"""Smoke test of the live endpoint: one call per model through the studio's client layer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from deploy.config import DeployConfig

PROMPT = "a red cube on a wooden table, studio lighting"


def sample_image(size: int) -> Image.Image:
    """A small scene with clear shapes and depth: sky, ground, a box."""
    image = Image.new("RGB", (size, size), (135, 180, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 3 // 5, size, size), fill=(120, 90, 60))
    draw.rectangle((size // 3, size // 3, size * 2 // 3, size * 2 // 3 + size // 10), fill=(200, 40, 40))
    return image


def sample_mask(size: int) -> Image.Image:
    """White (repaint) over the box, black (keep) elsewhere."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill=255)
    return mask


def smoke_calls(steps: int, seed: int) -> dict[str, Callable[[Any], Any]]:
    """Model name -> a call on a StudioClient, with small inputs."""
    scene, small = sample_image(512), sample_image(128)
    common = {"steps": steps, "seed": seed}
    return {
        "sd_base": lambda client: client.generate(PROMPT, **common),
        "sd_depth": lambda client: client.restyle(scene, "an oil painting of " + PROMPT, **common),
        "sd_inpaint": lambda client: client.erase(scene, sample_mask(512), "a green plant in a pot", **common),
        "sd_upscale": lambda client: client.upscale(small, PROMPT, **common),
    }


def smoke_test(cfg: DeployConfig, out_dir: Path, *, steps: int, seed: int) -> bool:
    """True when every model answered; each image is written to `out_dir`."""
    from studio.client import StudioClient, StudioError  # the studio layer is only needed here

    client = StudioClient.for_sagemaker(cfg.endpoint_name, cfg.region)
    out_dir.mkdir(parents=True, exist_ok=True)
    calls = smoke_calls(steps, seed)
    ok = True
    for model in cfg.models:
        try:
            result = calls[model](client)
        except StudioError as error:
            print(f"{model}: FAILED: {error}")
            ok = False
            continue
        for index, image in enumerate(result.images):
            path = out_dir / f"{model}-{index}.png"
            image.save(path)
            print(f"{model}: {path} ({image.width}x{image.height}, parameters {result.parameters})")
    return ok
