"""Weights for the Triton model repository: one diffusers pipeline folder per model.

    python -m serving.weights tiny [--models NAME ...] [--repository DIR] [--keep-existing]
    python -m serving.weights hub  [--models NAME ...] [--repository DIR] [--source NAME=REPO@COMMIT ...]
    python -m serving.weights full-size [--models NAME ...] [--repository DIR] [--keep-existing]

`tiny` builds small random-weight pipelines from the real diffusers and transformers classes,
offline and deterministically, so the whole serving stack runs and is tested on a CPU in seconds
(the images are noise). `hub` downloads the real fp16 weights of each model from the Hugging Face
Hub repository and commit the model table names (sdserve.catalog); `--source` or the environment
variable SD_STUDIO_WEIGHTS_<NAME> (e.g. SD_STUDIO_WEIGHTS_SD_BASE=org/repo@commit) choose another.
`full-size` builds the models at their real sizes with random weights, offline, in the real
repositories' fp16 layout (serving.full_size): for measuring sizes, memory and speed without them.
Each way the folder is `<repository>/<name>/1/checkpoint/`, with a `weights.json` marker beside
`model_index.json` saying what it holds (read back by `sdserve.checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdserve.catalog import MODELS, WEIGHTS_MARKER, WeightsSource
from sdserve.checkpoint import HUB_KIND, TINY_KIND, checkpoint_dir, read_marker

from serving import full_size

DEFAULT_REPOSITORY = Path(__file__).resolve().parent / "models"
HUB_VARIANT = "fp16"

# torch, diffusers and transformers are imported only once a pipeline is really built: they take
# seconds to import, and `tiny --keep-existing` runs on every `make` with usually nothing to do.


@dataclasses.dataclass(frozen=True)
class Component:
    """A pipeline component as data: a diffusers or transformers class and its constructor arguments."""

    library: str  # "diffusers" or "transformers"
    class_name: str
    config: dict[str, Any]

    def build(self) -> Any:
        cls = getattr(importlib.import_module(self.library), self.class_name)
        # transformers models take one config object; everything else takes keyword arguments.
        config_class = getattr(cls, "config_class", None)
        return cls(config_class(**self.config)) if config_class else cls(**self.config)


# --- Tiny recipes -----------------------------------------------------------------------------
# Sizes follow diffusers' own fast tests of the SD 2 pipelines; the SD 2 specifics are kept where
# they cost nothing (linear attention projections, per-block head dims, gelu text encoder,
# the schedulers and prediction types of the real repositories).

SEED = 0
MAX_PROMPT_TOKENS = 77  # CLIP's context length, as in every SD 2 tokenizer


def _byte_level_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: every byte, every byte ending a word, the merges, the specials.

    With all 512 byte tokens present any text tokenizes, whatever its script or emoji.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # "!" sorts first: id 0, SD 2's padding token
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


# A handful of merges, enough to exercise the BPE path ("the", "and", "ing" become single tokens).
TOKENIZER_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"), ("o", "f</w>"),
]
TOKENIZER_VOCAB = _byte_level_vocab(TOKENIZER_MERGES)

TOKENIZER = Component(
    "transformers",
    "CLIPTokenizer",
    {
        "vocab": TOKENIZER_VOCAB,
        "merges": TOKENIZER_MERGES,
        "model_max_length": MAX_PROMPT_TOKENS,
        "pad_token": "!",  # SD 2 (OpenCLIP) pads with "!", not with <|endoftext|> as SD 1 does
    },
)

TEXT_HIDDEN_SIZE = 32  # also the unet's cross-attention width, as 1024 is in SD 2

TEXT_ENCODER = Component(
    "transformers",
    "CLIPTextModel",
    {
        "vocab_size": len(TOKENIZER_VOCAB),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": 37,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_PROMPT_TOKENS,
        "projection_dim": TEXT_HIDDEN_SIZE,
        "hidden_act": "gelu",  # OpenCLIP ViT-H; SD 1's CLIP uses quick_gelu
        "bos_token_id": TOKENIZER_VOCAB["<|startoftext|>"],
        "eos_token_id": TOKENIZER_VOCAB["<|endoftext|>"],
        "pad_token_id": TOKENIZER_VOCAB["!"],
    },
)


def _unet(in_channels: int, **overrides: Any) -> Component:
    """The denoiser; only its input channels (and the upscaler's noise-level embedding) differ."""
    config = {
        "in_channels": in_channels,
        "out_channels": 4,
        "sample_size": 32,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": TEXT_HIDDEN_SIZE,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    }
    return Component("diffusers", "UNet2DConditionModel", {**config, **overrides})


def _vae(block_out_channels: tuple[int, ...], **overrides: Any) -> Component:
    """The autoencoder; each block after the first halves the image: the vae scale factor."""
    blocks = len(block_out_channels)
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": block_out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * blocks,
        "up_block_types": ("UpDecoderBlock2D",) * blocks,
        "sample_size": 64,
    }
    return Component("diffusers", "AutoencoderKL", {**config, **overrides})


# The noise schedules the models were trained with: SD 2's, and the x4 upscaler's own.
SD2_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
UPSCALER_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
# How the SD 2 repositories configure sampling on top of that schedule.
SAMPLING = {"steps_offset": 1, "set_alpha_to_one": False}
EPSILON = {"prediction_type": "epsilon"}  # all but the upscaler predict the noise

SD2_DDIM = Component("diffusers", "DDIMScheduler", {**SD2_BETAS, **SAMPLING, **EPSILON, "clip_sample": False})

TEXT_COMPONENTS = {"text_encoder": TEXT_ENCODER, "tokenizer": TOKENIZER}
# The SD 2 repositories ship no safety checker; saying so keeps diffusers from warning about it.
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

# Keyword arguments of each model's pipeline class: Components are built, other values passed as is.
TINY_PIPELINES: dict[str, dict[str, Any]] = {
    "sd_base": {
        "unet": _unet(in_channels=4),
        "vae": _vae((32, 64)),
        "scheduler": Component(
            "diffusers", "PNDMScheduler", {**SD2_BETAS, **SAMPLING, **EPSILON, "skip_prk_steps": True}
        ),
        **TEXT_COMPONENTS,
        **NO_SAFETY_CHECKER,
    },
    "sd_depth": {
        "unet": _unet(in_channels=5),  # noisy latents + the depth map
        "vae": _vae((32, 64)),
        "scheduler": SD2_DDIM,
        **TEXT_COMPONENTS,
        # A plain ViT DPT (the real one is DPT-hybrid MiDaS); its processor sizes the image for it.
        "depth_estimator": Component(
            "transformers",
            "DPTForDepthEstimation",
            {
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "intermediate_size": 37,
                "backbone_out_indices": (0, 1, 2, 3),
                "neck_hidden_sizes": (16, 32, 64, 64),
                "fusion_hidden_size": 32,
            },
        ),
        # The Pil class by name: the default one needs torchvision and falls back to it anyway.
        "feature_extractor": Component(
            "transformers",
            "DPTImageProcessorPil",
            {"size": {"height": 32, "width": 32}, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3},
        ),
    },
    "sd_inpaint": {
        "unet": _unet(in_channels=9),  # noisy latents + the mask + the masked image's latents
        "vae": _vae((32, 64)),
        "scheduler": SD2_DDIM,
        **TEXT_COMPONENTS,
        **NO_SAFETY_CHECKER,
    },
    "sd_upscale": {
        # Noisy latents + the low-resolution image; the noise level added to that image is a class label.
        # Its latents are as large as its input (a 256 px tile: 65,536 positions), so the tiny one
        # attends only after two downsamplings and its VAE not at all: attention over every latent
        # position would take minutes a tile on a CPU (the real model needs a GPU for that reason).
        # Its full-resolution blocks are the narrowest (16 channels, norm groups of 8) for the same reason.
        "unet": _unet(
            in_channels=7, num_class_embeds=1000, block_out_channels=(16, 32, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 4),
        ),
        # Three blocks make the scale factor 4, as in the real x4 model; 0.08333 is its latent scale.
        "vae": _vae((16, 16, 32), scaling_factor=0.08333, mid_block_add_attention=False, norm_num_groups=8),
        # The upscaler predicts v rather than the noise.
        "scheduler": Component(
            "diffusers",
            "DDIMScheduler",
            {**UPSCALER_BETAS, **SAMPLING, "clip_sample": False, "prediction_type": "v_prediction"},
        ),
        # Noises the low-resolution input up to the requested noise level.
        "low_res_scheduler": Component(
            "diffusers", "DDPMScheduler", {**UPSCALER_BETAS, **EPSILON, "clip_sample": False}
        ),
        "max_noise_level": 350,
        **TEXT_COMPONENTS,
    },
}


def tiny_recipe_id(name: str) -> str:
    """A short hash of everything that decides a tiny model's bytes, to tell a stale folder."""
    recipe = {"seed": SEED, "pipeline": MODELS[name].pipeline_class, "components": TINY_PIPELINES[name]}
    encoded = json.dumps(recipe, sort_keys=True, default=dataclasses.asdict).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def build_tiny_pipeline(name: str) -> Any:
    """The model's pipeline with random weights, the same bytes on every run."""
    import diffusers
    import torch

    torch.manual_seed(SEED)
    components = {
        key: value.build() if isinstance(value, Component) else value
        for key, value in TINY_PIPELINES[name].items()
    }
    return getattr(diffusers, MODELS[name].pipeline_class)(**components)


def write_tiny(name: str, checkpoint_dir: Path) -> None:
    pipeline = build_tiny_pipeline(name)
    with _replacing(checkpoint_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        _write_marker(staging, {"kind": TINY_KIND, "recipe": tiny_recipe_id(name), "model": name})


def tiny_is_current(name: str, checkpoint_dir: Path) -> bool:
    """Real weights are always worth keeping; tiny ones while their recipe is unchanged."""
    marker = read_marker(checkpoint_dir)
    return marker.get("kind") == HUB_KIND or (
        marker.get("kind") == TINY_KIND and marker.get("recipe") == tiny_recipe_id(name)
    )


def write_full_size(name: str, checkpoint_dir: Path, device: str = "cpu") -> None:
    """The model at its real size with random weights (serving.full_size), GBs; initialised on `device`."""
    with _replacing(checkpoint_dir) as staging:
        _write_marker(staging, full_size.write_checkpoint(name, staging, device=device))


# --- Real weights from the Hub -----------------------------------------------------------------


def select_hub_files(repo_files: list[str], model_index: dict, variant: str = HUB_VARIANT) -> list[str]:
    """The files `from_pretrained(folder, variant=variant)` needs out of a diffusers Hub repository.

    model_index.json, and for each component it names: its json and txt files (configs, tokenizer
    vocabulary) and its safetensors weights, the `variant` ones where the component has them and
    the plain ones otherwise. Left out: the original .ckpt/.safetensors checkpoints at the top,
    PyTorch .bin, Flax and ONNX weights, full-precision duplicates, images and docs.
    """
    components = [
        key
        for key, value in model_index.items()
        # [library, class], or [null, null] for a component the repository does not ship
        if not key.startswith("_") and isinstance(value, list) and value[0] is not None
    ]
    selected = ["model_index.json"]
    for component in components:
        files = [path for path in repo_files if path.rpartition("/")[0] == component]
        selected += [path for path in files if path.endswith((".json", ".txt"))]
        safetensors = [path for path in files if path.endswith(".safetensors")]
        variant_weights = [path for path in safetensors if path.endswith(f".{variant}.safetensors")]
        # Plain weights have no variant infix: "diffusion_pytorch_model.safetensors".
        plain_weights = [path for path in safetensors if path.rpartition("/")[2].count(".") == 1]
        selected += variant_weights or plain_weights
    return sorted(selected)


# Component classes the real checkpoints name that transformers 5 removed, and their
# successors (stable-diffusion-2-depth saves its feature extractor as DPTFeatureExtractor).
RENAMED_TRANSFORMERS_CLASSES = {"DPTFeatureExtractor": "DPTImageProcessor"}


def rename_removed_classes(model_index: dict) -> dict:
    """model_index.json with removed transformers classes replaced, so from_pretrained loads it."""
    return {
        key: ["transformers", RENAMED_TRANSFORMERS_CLASSES[value[1]]]
        if isinstance(value, list) and value[:1] == ["transformers"] and value[1] in RENAMED_TRANSFORMERS_CLASSES
        else value
        for key, value in model_index.items()
    }


SOURCE_ENV_PREFIX = "SD_STUDIO_WEIGHTS_"


def source_env_name(name: str) -> str:
    return SOURCE_ENV_PREFIX + name.upper()


def parse_source(text: str) -> tuple[str, str | None]:
    """"org/repo@commit" -> (repo, commit); "org/repo" -> (repo, None): keep the table's commit."""
    repo, _, revision = text.strip().partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{text!r} is not a Hub repository (org/name, optionally @commit)")
    return repo, revision or None


def weights_source(name: str, overrides: dict[str, str] | None = None,
                   environ: dict[str, str] | None = None) -> WeightsSource:
    """Where a model's real weights come from: `overrides` (the command line), then the
    environment (SD_STUDIO_WEIGHTS_<NAME>), then the model table."""
    table = MODELS[name].weights
    given = (overrides or {}).get(name) or (os.environ if environ is None else environ).get(source_env_name(name))
    if not given:
        return table
    repo, revision = parse_source(given)
    same_repo = repo == table.repo
    return WeightsSource(
        repo=repo,
        revision=revision or (table.revision if same_repo else "main"),
        licence=table.licence if same_repo else "see the repository's model card",
        note=table.note if same_repo else "chosen on the command line or in the environment",
    )


def write_hub(name: str, checkpoint_dir: Path, source: WeightsSource) -> None:
    """Download the model's real weights from `source`, pinned to its commit."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    # huggingface_hub reads the token from HF_TOKEN (or a saved login) by itself.
    repo_id, revision = source.repo, source.revision
    with _replacing(checkpoint_dir) as staging:
        # First, as it also tells whether the Hub can be reached: hf_hub_download reports a Hub it
        # cannot reach, or offline mode, as an OSError.
        model_index_path = hf_hub_download(repo_id, "model_index.json", revision=revision, local_dir=staging)
        model_index = json.loads(Path(model_index_path).read_text(encoding="utf-8"))
        info = HfApi().model_info(repo_id, revision=revision)
        repo_files = [sibling.rfilename for sibling in info.siblings]
        snapshot_download(
            repo_id,
            revision=info.sha,
            allow_patterns=select_hub_files(repo_files, model_index),
            local_dir=staging,
        )
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        index_path = staging / "model_index.json"
        index_path.write_text(json.dumps(rename_removed_classes(model_index), indent=2), encoding="utf-8")
        marker = {
            "kind": HUB_KIND,
            "model": name,
            "repo_id": repo_id,
            "revision": revision,
            "commit": info.sha,
            "variant": HUB_VARIANT,
        }
        _write_marker(staging, marker)


# --- Folders ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target` that takes its place once the block succeeds.

    A failed build or download leaves the old checkpoint as it was. The swap is two renames, so
    readers may find no folder for an instant, never a half-written one.
    """
    staging = target.with_name(f".{target.name}.{os.getpid()}.new")
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_marker(checkpoint_dir: Path, marker: dict) -> None:
    (checkpoint_dir / WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _folder_megabytes(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


# --- Command line -------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        metavar="NAME",
        help=f"models to write (default: all of {', '.join(MODELS)})",
    )
    common.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help="Triton model repository, written at <repository>/<name>/1/checkpoint (default: serving/models)",
    )

    tiny = commands.add_parser(
        "tiny",
        parents=[common],
        help="build tiny random-weight pipelines, offline",
        description="Build tiny random-weight pipelines from the real diffusers/transformers classes, "
        "offline and deterministically (a few MB each; the images they make are noise).",
    )
    tiny.add_argument(
        "--keep-existing",
        action="store_true",
        help="leave alone a model whose folder holds Hub weights, or tiny ones of the current recipe",
    )

    hub = commands.add_parser(
        "hub",
        parents=[common],
        help="download the real fp16 weights from the Hugging Face Hub",
        description="Download each model's fp16 safetensors and configs from its Hugging Face Hub "
        "repository (a few GB each). The token, when one is needed, comes from HF_TOKEN.",
    )
    hub.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=REPO[@COMMIT]",
        help="fetch NAME from another Hub repository (and commit; default: the table's commit when the "
        f"repository is the table's, else main); also {SOURCE_ENV_PREFIX}<NAME>=REPO[@COMMIT] in the "
        "environment. The table's sources: "
        + "; ".join(f"{name}: {spec.weights.repo}@{spec.weights.revision[:12]}" for name, spec in MODELS.items()),
    )
    full = commands.add_parser(
        "full-size",
        parents=[common],
        help="build the pipelines at their real sizes with random weights, offline",
        description="Build each model at its real size from the configurations its Hub repository "
        "publishes, with random weights, in the repository's fp16 layout (a few GB and about a minute "
        "of CPU each; the images they make are noise).",
    )
    full.add_argument(
        "--keep-existing",
        action="store_true",
        help="leave alone a model whose folder holds full-size weights of the current recipe",
    )
    args = parser.parse_args(argv)
    args.sources = {}
    for item in getattr(args, "source", []):
        name, _, source = item.partition("=")
        if name not in MODELS or not source:
            parser.error(f"--source {item!r}: expected NAME=REPO[@COMMIT] with NAME one of {', '.join(MODELS)}")
        try:
            parse_source(source)
        except ValueError as error:
            parser.error(f"--source {item!r}: {error}")
        args.sources[name] = source
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    for name in args.models:
        folder = checkpoint_dir(args.repository, name)
        kept = {"tiny": tiny_is_current, "full-size": full_size.is_current}.get(args.command)
        if getattr(args, "keep_existing", False) and kept(name, folder):
            print(f"{name}: kept the {read_marker(folder)['kind']} weights in {folder}")
            continue
        started = time.perf_counter()
        if args.command == "tiny":
            write_tiny(name, folder)
        elif args.command == "full-size":
            write_full_size(name, folder)
        else:
            try:
                source = weights_source(name, args.sources)
            except ValueError as error:
                sys.exit(f"error: {name}: {source_env_name(name)}: {error}")
            print(f"{name}: {source.repo}@{source.revision} ({source.licence}). {source.note}".rstrip())
            try:
                write_hub(name, folder, source)
            except OSError as error:  # how huggingface_hub reports a Hub it cannot reach or that refuses
                sys.exit(_hub_error_line(name, source, error))
        elapsed = time.perf_counter() - started
        print(f"{name}: wrote {_folder_megabytes(folder):.1f} MB to {folder} in {elapsed:.1f} s")


def _hub_error_line(name: str, source: WeightsSource, error: OSError) -> str:
    """One line for the terminal, instead of a traceback from deep inside huggingface_hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = f"{source.repo}@{source.revision}"
    override = (f"choose another source with --source {name}=REPO@COMMIT "
                f"or {source_env_name(name)}=REPO@COMMIT")
    if isinstance(error, RepositoryNotFoundError):
        return f"error: {name}: the Hub has no repository {source.repo} (or it needs a token in HF_TOKEN); {override}"
    if isinstance(error, RevisionNotFoundError):
        return f"error: {name}: {source.repo} has no commit {source.revision}; {override}"
    if isinstance(error, HfHubHTTPError):  # the Hub answered: no access, or another refusal
        problem = f"the Hugging Face Hub refused {repo_id}: {str(error).splitlines()[0]}"
    elif isinstance(error, (ConnectionError, LocalEntryNotFoundError)):
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no connection"
        problem = f"the Hugging Face Hub could not be reached ({reason}) to fetch {repo_id}"
    else:
        problem = f"fetching {repo_id} failed: {error}"
    return f"error: {name}: {problem}; `python -m serving.weights tiny` builds test weights offline"


if __name__ == "__main__":
    main()
