"""The model table (sdserve.catalog) is the one place a model is declared: what derives from it
stays derived, and the model names do not spread through the code again."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from sdserve.catalog import INPUT_NAMES, MODELS, MODELS_BY_TASK
from sdserve.params import WIDGETS

from serving import derived

ROOT = Path(__file__).resolve().parents[1]
# The table, the tiny-weight recipes, and each model's own model.py (plus at most one more file).
MAX_FILES_NAMING_A_MODEL = 4


def source_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in tracked.stdout.split() if not line.startswith("tests/")]


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
def test_a_model_is_named_in_at_most_four_source_files(spec):
    naming = [path.relative_to(ROOT) for path in source_files() if spec.name in path.read_text()]
    assert len(naming) <= MAX_FILES_NAMING_A_MODEL, naming


def test_sdserve_has_one_import_name():
    assert [path for path in source_files() if "serving.sdserve" in path.read_text()] == []
    assert [path for path in source_files() if ".pth" in path.read_text()] == []
    # The studio's image imports the table without torch.
    code = "import sys, sdserve.catalog, sdserve.params; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_a_variant_for_the_benchmarks_is_a_complete_model_folder(tmp_path, model_repository):
    spec = MODELS["sd_base"]
    folder = derived.model_variant(model_repository, spec, tmp_path, "sd_base_unbatched", dynamic_batching=False)
    config = (folder / "configs" / "cpu.pbtxt").read_text()
    assert 'name: "sd_base_unbatched"' in config and "dynamic_batching" not in config
    assert (folder / "1" / "model.py").read_text() == (model_repository / "sd_base" / "1" / "model.py").read_text()
    assert (folder / "1" / "checkpoint" / "model_index.json").is_file()
