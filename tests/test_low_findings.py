"""Low findings of the security review outside the studio, each with the test that reproduces it:
model weights load from safetensors only (a pickled `.bin` is never loaded)."""

from __future__ import annotations

import shutil

import pytest
from sdserve.checkpoint import checkpoint_dir

# (component, its safetensors file, the pickle file diffusers or transformers would load instead)
PICKLED_COMPONENTS = [
    pytest.param("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", id="unet-diffusers"),
    pytest.param("text_encoder", "model.safetensors", "pytorch_model.bin", id="text_encoder-transformers"),
]


@pytest.mark.pipeline
@pytest.mark.parametrize(("component", "safetensors_name", "pickle_name"), PICKLED_COMPONENTS)
def test_a_checkpoint_with_pickled_weights_is_refused(model_repository, tmp_path, component, safetensors_name, pickle_name):
    import torch
    from safetensors.torch import load_file
    from sdserve.pipelines import load_pipeline

    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint_dir(model_repository, "sd_base"), folder)
    weights = folder / component / safetensors_name
    # The same tensors, pickled: loading them would work, and would run whatever a pickle holds.
    torch.save(load_file(weights), folder / component / pickle_name)
    weights.unlink()
    with pytest.raises(OSError, match=r"safetensors"):
        load_pipeline("sd_base", folder)
