"""The marker file beside a checkpoint, saying which weights it holds."""

from __future__ import annotations

import json
from pathlib import Path

from .catalog import CHECKPOINT_DIR, WEIGHTS_MARKER

TINY_KIND = "tiny-random"
# The real SD 2 architectures with random weights (python -m serving.weights full-size): real
# sizes, memory and step times, but every image noise like the tiny ones.
FULL_SIZE_KIND = "full-size-random"
HUB_KIND = "hub"
RANDOM_KINDS = (TINY_KIND, FULL_SIZE_KIND)  # weights whose images are noise, as the studio warns


def checkpoint_dir(repository: Path, model: str) -> Path:
    """Where a model's diffusers pipeline folder sits in a Triton model repository."""
    return Path(repository) / model / "1" / CHECKPOINT_DIR


def has_checkpoint(repository: Path, model: str) -> bool:
    return (checkpoint_dir(repository, model) / "model_index.json").is_file()


def read_marker(checkpoint_dir: Path) -> dict:
    """{"kind": "tiny-random" | "hub", ...}, or {} when the folder has no marker."""
    marker = Path(checkpoint_dir) / WEIGHTS_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def checkpoint_variant(checkpoint_dir: Path) -> str | None:
    """The weights variant to ask from_pretrained for, as the marker records it: the Hub download and
    the full-size random weights keep fp16 files only; the tiny weights have no variant."""
    return read_marker(checkpoint_dir).get("variant")
