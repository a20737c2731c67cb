"""The model table (sdserve.catalog) is the one place a model is declared: what derives from it
stays derived, and the model names do not spread through the code again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from sdserve.catalog import (
    GENERATED_IMAGE,
    INPUT_NAMES,
    MAX_PAYLOAD_BYTES,
    MIN_IMAGE_SIDE,
    MODELS,
    MODELS_BY_TASK,
    PARAMETERS,
    SIZE_MULTIPLE,
)
from sdserve.params import STRENGTH, WIDGETS
from sdserve.wire import worst_case_answer_bytes

from serving import derived

ROOT = Path(__file__).resolve().parents[1]
# The table, the tiny-weight recipes, and each model's own model.py (plus at most one more file).
MAX_FILES_NAMING_A_MODEL = 4


def source_files() -> list[Path]:
    """The checkout's Python files as they are now: tracked or new (not ignored), not deleted."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    paths = {ROOT / line for line in listed.stdout.split() if not line.startswith("tests/")}
    return sorted(path for path in paths if path.is_file())


def test_the_triton_configs_are_the_ones_the_table_gives():
    assert derived.stale_files() == [], "run `python -m serving.derived`"


def test_a_stale_config_is_found_and_rewritten(tmp_path):
    assert len(derived.stale_files(tmp_path, None)) == 2 * len(MODELS)
    assert derived.main(["--repository", str(tmp_path), "--no-table-doc", "--check"]) == 1
    assert derived.main(["--repository", str(tmp_path), "--no-table-doc"]) == 0
    assert derived.stale_files(tmp_path, None) == []
    config = (tmp_path / "sd_inpaint" / "configs" / "cpu.pbtxt").read_text()
    assert 'name: "sd_inpaint"' in config and "KIND_CPU" in config and '"mask_image"' in config
    assert '"mask_image"' not in (tmp_path / "sd_upscale" / "config.pbtxt").read_text()


@pytest.mark.parametrize("spec", MODELS.values(), ids=lambda spec: spec.name)
def test_each_entry_is_complete(spec):
    assert MODELS_BY_TASK[spec.task] is spec
    assert set(spec.inputs) <= set(INPUT_NAMES) and spec.inputs[0] == "prompt"
    assert spec.takes_mask <= spec.takes_image
    assert re.fullmatch(r"[0-9a-f]{40}", spec.weights.revision), "weights are pinned to a commit"
    assert spec.weights.repo.count("/") == 1 and spec.weights.licence
    names = spec.argument_names
    assert len(set(names)) == len(names)
    for argument in spec.arguments:
        assert argument.label and argument.widget in WIDGETS
        assert argument.check(argument.default) == argument.default


@pytest.mark.parametrize("spec", MODELS.values(), ids=lambda spec: spec.name)
def test_the_facts_on_each_entry_agree(spec):
    """What code reads off an entry instead of branching on a model's or an argument's name."""
    names = spec.argument_names
    assert spec.strength_scales_steps == (STRENGTH in names)
    assert spec.takes_image != ("width" in names and "height" in names)  # a size from the image, or asked for
    if spec.working_side is not None:
        assert spec.takes_mask and MIN_IMAGE_SIDE <= spec.working_side <= spec.max_image_side
    assert (spec.tiling is not None) == (spec.output_scale > 1), "a larger output is tiled when too large"
    assert spec.max_input_side == (spec.tiling.max_input_side if spec.tiling else spec.max_image_side)
    if spec.tiling is not None:
        tiling, out = spec.tiling, spec.tiling.side * spec.output_scale
        assert tiling.side % SIZE_MULTIPLE == 0 and MIN_IMAGE_SIDE <= tiling.side <= spec.max_image_side
        assert 0 <= tiling.overlap < tiling.side and tiling.max_input_side >= spec.max_image_side
        assert worst_case_answer_bytes(out, out) <= MAX_PAYLOAD_BYTES, "every tile's answer fits as PNG"
    assert [argument.name for argument in spec.arguments if argument.main] == [
        name for name in ("width", "height", STRENGTH, "noise_level") if name in names]


@pytest.mark.process
def test_the_outputs_are_named_once():
    """The server (sdserve.batch, images), the client (sdserve.wire, studio.metadata) and the configs
    (serving.derived) take the output names from the table: no file spells them out again."""
    assert (GENERATED_IMAGE, PARAMETERS) == ("generated_image", "parameters")
    naming = [str(path.relative_to(ROOT)) for path in source_files() if '"generated_image"' in path.read_text()]
    assert naming == ["serving/sdserve/catalog.py"]
    speaking = ["serving/derived.py", "serving/sdserve/batch.py", "serving/sdserve/images.py", "serving/sdserve/wire.py",
                "studio/client.py", "studio/metadata.py"]
    assert [path for path in speaking if '"parameters"' in (ROOT / path).read_text()] == []


@pytest.mark.process
@pytest.mark.parametrize("spec", MODELS.values(), ids=lambda spec: spec.name)
def test_a_model_is_named_in_at_most_four_source_files(spec):
    naming = [path.relative_to(ROOT) for path in source_files() if spec.name in path.read_text()]
    assert len(naming) <= MAX_FILES_NAMING_A_MODEL, naming


@pytest.mark.process
def test_sdserve_has_one_import_name():
    assert [path for path in source_files() if "serving.sdserve" in path.read_text()] == []
    assert [path for path in source_files() if ".pth" in path.read_text()] == []
    # The studio's image imports the table without torch.
    code = "import sys, sdserve.catalog, sdserve.params; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.process
def test_a_variant_for_the_benchmarks_is_a_complete_model_folder(tmp_path, model_repository):
    spec = MODELS["sd_base"]
    folder = derived.model_variant(model_repository, spec, tmp_path, "sd_base_unbatched", dynamic_batching=False)
    config = (folder / "configs" / "cpu.pbtxt").read_text()
    assert 'name: "sd_base_unbatched"' in config and "dynamic_batching" not in config
    assert (folder / "1" / "model.py").read_text() == (model_repository / "sd_base" / "1" / "model.py").read_text()
    assert (folder / "1" / "checkpoint" / "model_index.json").is_file()
