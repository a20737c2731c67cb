"""Triton Python-backend model `sd_depth`: the shared logic is in sdserve."""

import sys
from pathlib import Path

# Model archives carry their own copy of sdserve beside this file; it wins over any other.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdserve.triton_model import StableDiffusionModel  # noqa: E402


class TritonPythonModel(StableDiffusionModel):
    model_name = "sd_depth"
