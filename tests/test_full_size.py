"""serving/full_size.py: the recipes at their published sizes, the tokenizer's layout, and the writer.

The fast tier builds every component on the meta device (shapes, no memory) and counts its
parameters against the published figure; the pipeline tier writes small stand-ins in the same
layout and loads them as the real repositories load. A real full-size build takes minutes and GBs
(`python -m serving.weights full-size`); bench/full_size.py measures with them.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from sdserve.catalog import CHECKPOINT_DIR, MODELS, MODELS_BY_TASK, WEIGHTS_MARKER

from serving import full_size, weights
from serving.full_size import FULL_SIZE_KIND, FULL_SIZE_PIPELINES, Part, Tokenizer

COMPONENTS = [(name, key) for name in MODELS for key in full_size.weight_parts(name)]


@pytest.mark.parametrize(("name", "key"), COMPONENTS, ids=[f"{name}-{key}" for name, key in COMPONENTS])
def test_every_component_has_its_published_size(name: str, key: str) -> None:
    import torch

    part = full_size.weight_parts(name)[key]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = part.build()
    parameters = sum(p.numel() for p in model.parameters())
    published = part.published
    assert abs(parameters - published.parameters) <= published.within, (
        f"{name} {key}: {parameters / 1e6:.2f}M parameters, published {published.parameters / 1e6:.2f}M "
        f"(within {published.within / 1e6:.2f}M) by {published.source}")


def test_every_repository_the_table_pins_has_one_recipe() -> None:
    assert set(FULL_SIZE_PIPELINES) == {spec.weights.repo for spec in MODELS.values()}


def test_the_tokenizer_has_clips_size_and_layout(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer_part = full_size.recipe(MODELS_BY_TASK["generate"].name)["tokenizer"]
    vocab, merges = tokenizer_part.vocabulary()
    assert len(vocab) == full_size.SD2_TEXT_ENCODER["vocab_size"] == 49408
    assert all(left in vocab and right in vocab and left + right in vocab for left, right in merges)

    tokenizer_part.write(tmp_path / "tokenizer")
    assert sorted(path.name for path in (tmp_path / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # as on the Hub
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(tokenizer) == 49408
    # Where the real vocabulary has them: SD 2 pads with "!", id 0.
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 49406, 49407)
    ids = tokenizer("A lighthouse at dusk, 灯台 🎨 " * 40, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte has a token


@pytest.mark.parametrize("name", list(MODELS))
def test_each_recipe_is_what_its_pipeline_class_takes(name: str) -> None:
    import diffusers

    parameters = inspect.signature(getattr(diffusers, MODELS[name].pipeline_class).__init__).parameters
    recipe = full_size.recipe(name)
    assert set(recipe) <= set(parameters)
    required = {key for key, parameter in parameters.items() if key != "self" and parameter.default is inspect.Parameter.empty}
    assert required <= set(recipe)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_tiny_recipes_stand_for_the_full_size_ones(name: str) -> None:
    """What the serving code and the pipelines branch on is the same at both sizes: the tests'
    tiny weights exercise the paths the real ones take."""
    tiny, full = weights.TINY_PIPELINES[name], full_size.recipe(name)
    assert set(tiny) - {"safety_checker", "feature_extractor", "requires_safety_checker"} == \
        set(full) - {"safety_checker", "feature_extractor", "requires_safety_checker"}
    unet, tiny_unet = full["unet"].config, tiny["unet"].config
    assert tiny_unet["in_channels"] == unet["in_channels"]
    assert tiny_unet.get("num_class_embeds") == unet["num_class_embeds"]
    # (Not the vae scale factor: the tiny SD 2 vaes halve the image once where the real ones do
    # three times; the code reads it from the pipeline, pipe.vae_scale_factor.)
    assert tiny["vae"].config.get("scaling_factor", 0.18215) == full["vae"].config["scaling_factor"]
    assert tiny["text_encoder"].config["hidden_act"] == full["text_encoder"].config["hidden_act"]
    assert tiny["tokenizer"].config["pad_token"] == full["tokenizer"].config["pad_token"]
    for key in ("scheduler", "low_res_scheduler"):
        if key in full:
            schedule = ("beta_schedule", "beta_start", "beta_end", "prediction_type", "steps_offset")
            assert {k: tiny[key].config.get(k, "epsilon" if k == "prediction_type" else None) for k in schedule} \
                == {k: full[key].config.get(k) for k in schedule}, key
    assert tiny.get("max_noise_level") == full.get("max_noise_level")


def test_a_folder_is_current_only_with_the_recipes_marker(tmp_path: Path) -> None:
    marker = {"kind": FULL_SIZE_KIND, "model": "sd_base", "recipe": full_size.recipe_id("sd_base")}
    (tmp_path / WEIGHTS_MARKER).write_text(json.dumps(marker))
    assert full_size.is_current("sd_base", tmp_path)
    assert not full_size.is_current("sd_depth", tmp_path)
    (tmp_path / WEIGHTS_MARKER).write_text(json.dumps({**marker, "recipe": "older"}))
    assert not full_size.is_current("sd_base", tmp_path)
    (tmp_path / WEIGHTS_MARKER).write_text(json.dumps({"kind": "hub", "model": "sd_base"}))
    assert not full_size.is_current("sd_base", tmp_path)


def test_the_command_line_offers_full_size() -> None:
    args = weights._parse_args(["full-size", "--models", "sd_base", "--keep-existing"])
    assert (args.command, args.models, args.keep_existing) == ("full-size", ["sd_base"], True)


# --- The writer, with small stand-ins in the same layout ---------------------------------------------


def miniature(name: str) -> dict:
    """The model's full-size recipe with small weight-carrying parts (the tiny recipes' sizes);
    everything else (tokenizer, schedulers, image processors, model_index entries) as published."""
    tiny = weights.TINY_PIPELINES[name]
    small_text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "projection_dim": 32}  # the tiny unet's cross-attention width; the vocabulary stays full
    recipe = {}
    for key, value in full_size.recipe(name).items():
        if isinstance(value, Part) and value.published is not None:
            config = {**value.config, **small_text} if key == "text_encoder" else tiny[key].config
            value = dataclasses.replace(value, config=config)
        recipe[key] = value
    return recipe


def layout(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.pipeline
@pytest.mark.parametrize("name", list(MODELS))
def test_the_writer_lays_out_the_hub_repository_and_it_loads_as_one(name: str, tmp_path: Path) -> None:
    import diffusers
    import torch
    from safetensors import safe_open

    folder = tmp_path / name / "1" / CHECKPOINT_DIR
    marker = full_size.write_checkpoint(name, folder, pipeline=miniature(name))

    files = layout(folder)
    for key, value in full_size.recipe(name).items():
        if isinstance(value, Tokenizer):
            assert {f"{key}/vocab.json", f"{key}/merges.txt"} <= files
        elif isinstance(value, Part) and value.published is not None:
            weights_file = "diffusion_pytorch_model" if value.library == "diffusers" else "model"
            assert {f"{key}/config.json", f"{key}/{weights_file}.fp16.safetensors"} <= files
        elif isinstance(value, Part):
            assert f"{key}/{'scheduler' if value.library == 'diffusers' else 'preprocessor'}_config.json" in files
    weight_files = [folder / path for path in files if path.endswith(".safetensors")]
    assert all(path.name.endswith(".fp16.safetensors") for path in weight_files)  # no full-precision copies
    for path in weight_files:
        with safe_open(path, framework="pt") as tensors:
            assert {tensors.get_slice(key).get_dtype() for key in tensors.keys()} == {"F16"}, path
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == MODELS[name].pipeline_class

    assert marker["kind"] == FULL_SIZE_KIND and marker["variant"] == "fp16" and marker["model"] == name
    pipeline = getattr(diffusers, MODELS[name].pipeline_class).from_pretrained(
        folder, variant=marker["variant"], dtype=torch.float16)
    assert pipeline.unet.dtype == torch.float16
    assert len(pipeline.tokenizer) == 49408
    assert type(pipeline.scheduler).__name__ == index["scheduler"][1]
    assert marker["parameters"] == sum(
        sum(p.numel() for p in getattr(pipeline, key).parameters()) for key in full_size.weight_parts(name))


@pytest.mark.pipeline
def test_a_written_model_makes_an_image_and_packs_into_an_archive(tmp_path: Path) -> None:
    import diffusers
    import torch

    from serving.archive import build_model_archive, safe_extract

    repository = tmp_path / "repository"
    folder = repository / "sd_base" / "1" / CHECKPOINT_DIR
    (folder.parent / "model.py").parent.mkdir(parents=True)
    source = Path(weights.DEFAULT_REPOSITORY) / "sd_base"
    (repository / "sd_base" / "config.pbtxt").write_text((source / "config.pbtxt").read_text())
    (folder.parent / "model.py").write_text((source / "1" / "model.py").read_text())
    marker = full_size.write_checkpoint("sd_base", folder, pipeline=miniature("sd_base"))
    (folder / WEIGHTS_MARKER).write_text(json.dumps(marker))

    archive = build_model_archive("sd_base", repository, tmp_path / "store")
    extracted = safe_extract(archive, tmp_path / "extracted", max_total_bytes=2**30) / "sd_base" / "1" / CHECKPOINT_DIR
    assert layout(extracted) == layout(folder)

    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(extracted, variant="fp16", dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a lighthouse at dusk", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert image.size == (64, 64)


# --- The benchmarks, on the tiny weights -------------------------------------------------------------


@pytest.mark.pipeline
def test_the_gpu_bench_runs_on_a_cpu_with_the_tiny_weights(model_repository: Path, tmp_path: Path) -> None:
    from bench import gpu_full_size

    out = tmp_path / "figures.json"
    assert gpu_full_size.main([
        "--device", "cpu", "--repository", str(model_repository), "--size", "64", "--steps", "2",
        "--batches", "1", "2", "--working-side", "64", "--upscale-inputs", "32", "--decode-size", "128",
        "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for way in ("plain diffusers", "project"):
        assert set(figures["throughput"][way]) == {"1", "2"} and min(figures["throughput"][way].values()) > 0
    assert set(figures["peak_memory"]) == set(MODELS)
    assert set(figures["upscaler"]["inputs"]) == {"32"}
    assert set(figures["upscaler"]["decode"]) == {"untiled", "tiled"}
    assert figures["optimisation"]["name"] == "channels_last" and figures["optimisation"]["ratio"] > 0


@pytest.mark.triton
@pytest.mark.aws
def test_the_full_size_bench_runs_through_the_endpoint_on_the_tiny_weights(model_repository: Path,
                                                                            tmp_path: Path) -> None:
    from bench import full_size as bench

    out = tmp_path / "figures.json"
    assert bench.main(["--dry-run", "--models", "sd_base", "sd_upscale", "--work", str(tmp_path / "work"),
                       "--gzip-levels", "1", "--repeats", "1", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["packaging"]) == set(figures["models_measured"]) == {"sd_base", "sd_upscale"}
    assert figures["gzip_levels"]["1"]["deflate_s"] > 0 and figures["gzip_levels"]["1"]["inflate_s"] > 0
    for measured in figures["models_measured"].values():
        split = measured["cold_split_s"]
        assert set(split) == {"fetch_s", "extract_s", "load_s", "first_answer_s"}
        assert min(split.values()) >= 0 and split["load_s"] > 0
        assert measured["resident_bytes"] > 0 and measured["fits"]["value"] > 0
        assert measured["plain_from_pretrained_s"] > 0 and measured["extract_load"]["value"] > 0
    cycling = figures["cycling"]
    assert cycling["loads"] >= 2 and len(cycling["per_call_s"]) == 4
    # Each archive fetched once on the fresh cache, the second round answered as the first.
    assert cycling["fetches"]["value"] == 1.0 and cycling["same_answers"]["value"] == 1.0
    assert cycling["oom_kills"] == 0
