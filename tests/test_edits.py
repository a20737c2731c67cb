"""Erase and Extend (studio/edits.py): masks, the box sent, the paste back; then through the real
local endpoint (real Triton, the tiny inpainting pipeline): every pixel the mask does not reach
comes back byte for byte, at several sizes, non-square and larger than the model's working size."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sdserve.catalog import MODELS

from studio.client import EndpointConfig, StudioClient
from studio.errors import StudioError
from studio.edits import (
    ERASE,
    EXTEND,
    extension_mask,
    feathered_mask,
    grown,
    plan_edit,
    working_size,
)
from studio.metadata import image_to_png, read_parameters
from studio.planning import plan_job
from studio.runner import run_job
from studio.tasks import TASKS, task_of

from .endpoint_support import ENDPOINT_NAME, STEPS

INPAINT = MODELS["sd_inpaint"]


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Noise: any pixel that moves, moves visibly."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def painted(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def assert_untouched_outside(result: Image.Image, canvas: Image.Image, alpha: Image.Image) -> None:
    """Byte-identical wherever the alpha is 0; and the edit did change the pixels it mostly owns."""
    assert result.size == canvas.size
    outside = np.asarray(alpha) == 0
    assert outside.any()
    assert np.array_equal(pixels(result)[outside], pixels(canvas)[outside])
    inside = np.asarray(alpha) >= 128
    assert inside.any() and (pixels(result)[inside] != pixels(canvas)[inside]).any()


# --- masks and boxes -------------------------------------------------------------------------


def test_grow_and_shrink_are_round_about_and_keep_the_border():
    dot = Image.new("L", (41, 41), 0)
    dot.putpixel((20, 20), 255)
    grown_dot = np.asarray(grown(dot, 6)) > 0
    rows, columns = np.nonzero(grown_dot)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (14, 26, 14, 26)
    assert not grown_dot[14, 14]  # an octagon, not a square: the corner is left out
    square = Image.new("L", (40, 40), 0)
    square.paste(255, (0, 10, 20, 30))  # touches the left border
    shrunk = np.asarray(grown(square, -4)) > 0
    rows, columns = np.nonzero(shrunk)
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (14, 25, 0, 15)


def test_feathering_fades_the_edge_and_reaches_only_near_it():
    mask = painted((96, 96), (32, 32, 63, 63))
    alpha = np.asarray(feathered_mask(mask, grow=0, feather=4))
    assert alpha[48, 48] == 255 and 0 < alpha[48, 31] < 255
    reach = np.nonzero(alpha)
    assert min(reach[0]) >= 32 - 4 * 4 and max(reach[0]) <= 63 + 4 * 4


def test_the_extension_mask_owns_the_border_and_fades_across_the_overlap():
    sides = {"left": 16, "right": 0, "top": 0, "bottom": 8}
    alpha = np.asarray(extension_mask((80, 48), sides, overlap=8))
    assert (alpha[:, :16] == 255).all() and (alpha[40:, :] == 255).all()
    assert list(alpha[10, 16:25]) == [239, 207, 175, 143, 112, 80, 48, 16, 0]
    assert (alpha[:32, 24:] == 0).all()
    assert (np.asarray(extension_mask((80, 48), sides, overlap=0))[:40, 16:] == 0).all()


@pytest.mark.parametrize(
    "box, side, expected",
    [((100, 50), 512, (512, 256)), ((900, 600), 512, (512, 344)), ((1000, 20), 512, (1024, 32)),
     ((40, 40), 64, (64, 64)), ((96, 64), 128, (128, 88))],
)
def test_the_box_is_sent_at_the_work_size_in_multiples_of_8(box, side, expected):
    assert working_size(box, side, INPAINT.max_image_side) == expected


@pytest.mark.parametrize("size", [(64, 64), (160, 96), (1024, 700), (700, 1024), (33, 1024)])
@pytest.mark.parametrize("only_masked", [True, False])
def test_a_pasted_answer_changes_nothing_outside_the_mask(size, only_masked):
    """Whatever the endpoint answers (here: noise of the size sent), pixels at alpha 0 stay the input's."""
    width, height = size
    image = photo(size)
    mask = painted(size, (width // 3, height // 3, width // 2, height // 2))
    edit = plan_edit(ERASE, image, mask, {**ERASE.defaults(), "mask_grow": 3, "mask_feather": 5, "only_masked": only_masked},
                     INPAINT.max_image_side)
    assert edit.call_image.size == edit.sent_size == edit.call_mask.size
    assert edit.sent_size[0] % 8 == 0 and edit.sent_size[1] % 8 == 0
    assert_untouched_outside(edit.paste(photo(edit.sent_size, seed=1)), image, edit.alpha)


def test_extend_pastes_on_a_larger_canvas_and_keeps_the_old_image_beyond_the_overlap():
    image = photo((300, 200))
    edit = plan_edit(EXTEND, image, None, {**EXTEND.defaults(), "extend_right": 64, "extend_top": 40, "extend_overlap": 16},
                     1024)
    assert edit.canvas.size == (364, 240)
    result = edit.paste(photo(edit.sent_size, seed=2))
    old = pixels(result)[40:, :300]
    assert np.array_equal(old[16:, :284], pixels(image)[16:, :284])  # beyond the 16 px overlap: the old pixels
    assert_untouched_outside(result, edit.canvas, edit.alpha)


@pytest.mark.parametrize(
    "task, settings, words",
    [
        ("extend", {}, "at least one side"),
        ("extend", {"extend_left": 512, "extend_right": 512}, "would be 1088×64 px; Extend makes at most 1024 px"),
        ("extend", {"extend_left": 520}, "Left (px): must be from 0 to 512; got 520"),
        ("erase", {"mask_grow": 100}, "Grow mask (px): must be from -64 to 64; got 100"),
        ("erase", {"mask_grow": -40}, "empty after shrinking it by 40 px"),
        ("erase", {"only_masked": "yes"}, "Only the masked area, at full resolution: must be true or false"),
        ("erase", {"work_side": 100}, "Work size (px): must be a multiple of 8"),
        ("erase", {"extend_left": 8}, "erase takes no argument 'extend_left'"),
        ("generate", {"mask_grow": 2}, "generate takes no argument 'mask_grow'"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting_and_its_limit(task, settings, words):
    gen_args = {} if task != "generate" else {"width": 64}
    with pytest.raises(StudioError, match=re.escape(words)):
        plan_job(TASKS[task].check({"prompt": "a tree", **gen_args, **settings}, photo((64, 64)),
                                   painted((64, 64), (20, 20, 40, 40))))


def test_the_tabs_take_the_settings_as_controls_and_plan_with_them():
    assert [c.name for c in TASKS["extend"].controls][-7:] == [
        "extend_left", "extend_right", "extend_top", "extend_bottom", "extend_overlap", "mask_padding", "work_side"]
    plan = plan_job(TASKS["erase"].check({"prompt": "", "mask_feather": 3.0, "only_masked": False, "seed": 4},
                                         photo((96, 64)), painted((96, 64), (30, 20, 50, 40))))
    assert plan.edit.settings["mask_feather"] == 3 and plan.edit.box == (0, 0, 96, 64)
    assert "mask_feather" not in plan.calls[0].gen_args and plan.calls[0].inputs["image"].size == (96, 64)


# --- through the real local endpoint -----------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(shared_endpoint):
    return shared_endpoint


@pytest.fixture(scope="module")
def client(endpoint) -> StudioClient:
    return StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url, backoff_s=0.2))


def run_edit(client, task, image, mask=None, **settings):
    inputs = TASKS[task].check({"prompt": "a stone wall", "num_inference_steps": STEPS, "seed": 5, **settings},
                               image, mask)
    plan = plan_job(inputs)
    result = run_job(client, plan).raise_for_errors()
    return plan, result


@pytest.mark.triton
@pytest.mark.parametrize(
    "size, box, settings",
    [
        ((64, 64), (20, 16, 44, 40), {"work_side": 128}),  # the box enlarged to the work size
        ((160, 96), (100, 50, 150, 90), {"work_side": 64, "mask_grow": 4}),  # non-square, near a corner
        ((700, 450), (300, 180, 420, 260), {"work_side": 128, "mask_feather": 12}),  # over the working size
        ((96, 64), (30, 20, 60, 44), {"only_masked": False, "mask_grow": -2}),  # the whole image
    ],
)
def test_erase_through_the_endpoint_touches_only_the_feathered_mask(client, size, box, settings):
    image, mask = photo(size), painted(size, box)
    plan, result = run_edit(client, "erase", image, mask, **settings)
    assert_untouched_outside(result.images[0], image, plan.edit.alpha)
    parameters = read_parameters(result.png[0])
    assert parameters["model"] == "sd_inpaint" and parameters["task"] == "erase" and parameters["seed"] == 5
    assert (parameters["width"], parameters["height"]) == size
    assert {name: parameters[name] for name in plan.edit.settings} == plan.edit.settings
    assert parameters["edit_sent_size"] == list(plan.edit.sent_size)


@pytest.mark.triton
@pytest.mark.parametrize(
    "size, settings",
    [
        ((64, 64), {"extend_left": 32, "extend_top": 24, "work_side": 128}),
        ((600, 200), {"extend_right": 128, "extend_overlap": 24, "work_side": 128}),  # wider than the work size
        ((96, 72), {"extend_left": 24, "extend_right": 24, "extend_top": 24, "extend_bottom": 24,
                    "extend_overlap": 8, "work_side": 64}),
    ],
)
def test_extend_through_the_endpoint_keeps_the_old_image_outside_the_overlap(client, size, settings):
    image = photo(size)
    plan, result = run_edit(client, "extend", image, **settings)
    made = result.images[0]
    left, top = settings.get("extend_left", 0), settings.get("extend_top", 0)
    width = size[0] + left + settings.get("extend_right", 0)
    height = size[1] + top + settings.get("extend_bottom", 0)
    assert made.size == (width, height)
    assert_untouched_outside(made, plan.edit.canvas, plan.edit.alpha)
    # The old image's own pixels (not the edge repeated into the borders) beyond the overlap.
    overlap = settings.get("extend_overlap", 32)
    old = pixels(made)[top:top + size[1], left:left + size[0]]
    kept = np.asarray(plan.edit.alpha)[top:top + size[1], left:left + size[0]] == 0
    assert kept.sum() >= (size[0] - 2 * overlap) * (size[1] - 2 * overlap)
    assert np.array_equal(old[kept], pixels(image)[kept])
    parameters = read_parameters(result.png[0])
    assert parameters["task"] == "extend" and (parameters["width"], parameters["height"]) == (width, height)
    assert parameters["extend_overlap"] == overlap


# --- the studio around them: previews, restore, Vary ----------------------------------------------


def test_the_preview_tints_what_is_repainted_and_outlines_the_box():
    image, mask = photo((96, 64)), painted((96, 64), (40, 20, 60, 40))
    shown = TASKS["erase"].preview({"mask_feather": 2.0, "mask_padding": 8.0}, image, mask)
    assert shown.size == (96, 64)
    edit = plan_edit(ERASE, image, mask, {**ERASE.defaults(), "mask_feather": 2, "mask_padding": 8}, 1024)
    left, top, right, bottom = edit.box
    assert shown.getpixel((left, top)) == (0, 200, 255)  # the outline
    assert shown.getpixel((5, 5)) == image.getpixel((5, 5))  # untouched outside the box
    assert shown.getpixel((50, 30)) != image.getpixel((50, 30))  # tinted where it is repainted
    # Nothing to preview yet, or a setting out of its range: no preview, no error.
    assert TASKS["erase"].preview({}, image, None) is None
    assert TASKS["extend"].preview({"extend_left": 1000}, image) is None
    assert TASKS["extend"].preview({"extend_left": 16}, image).size == (112, 64)


def test_an_extended_result_restores_into_extend_with_its_settings(tmp_path):
    from studio.session import restore_from_png, restored_values
    from studio.store import ResultStore

    parameters = {"model": "sd_inpaint", "task": "extend", "seed": 4, "extend_right": 40, "extend_overlap": 8,
                  "prompt": "more sea"}
    png = image_to_png(photo((104, 64)), parameters)
    entry = restore_from_png(ResultStore(tmp_path / "results"), png)
    assert entry["task"] == "extend"
    values = restored_values(TASKS["extend"], entry["parameters"])
    assert (values["extend_right"], values["extend_overlap"], values["seed"]) == (40, 8, 4)
    # A plain inpainting result (no "task"), or one naming a tool of another model, restores into Erase.
    assert task_of({"model": "sd_inpaint"}).name == "erase"
    assert task_of({"model": "sd_base", "task": "extend"}).name == "generate"


def test_a_switch_takes_on_or_off_only():
    only_masked = TASKS["erase"].control("only_masked")
    assert only_masked.check(False) is False and only_masked.check(1) is True
    with pytest.raises(StudioError, match="must be true or false"):
        only_masked.check("yes")
    assert only_masked.restore("yes") is True  # the default, for a forged PNG


def test_vary_keeps_the_results_values_and_picks_a_new_variation_seed():
    from studio.session import VARY_STRENGTH, vary_values

    parameters = {"model": "sd_base", "prompt": "a harbour", "seed": 500, "width": 64, "height": 64,
                  "variation_seed": 3, "variation_strength": 0.0}
    values = vary_values(TASKS["generate"], parameters, lambda: 77)
    assert (values["seed"], values["variation_seed"], values["variation_strength"]) == (500, 77, VARY_STRENGTH)
    assert values["prompt"] == "a harbour" and values["width"] == 64
    plan = plan_job(TASKS["generate"].check({**values, "num_images_per_prompt": 2}))
    assert [(call.seed, call.gen_args["variation_seed"]) for call in plan.calls] == [(500, 77), (500, 78)]


@pytest.mark.triton
def test_the_client_methods_take_the_settings_beside_the_models_arguments(client):
    image = photo((64, 48))
    result = client.extend(image, "more sky", extend_top=16, extend_overlap=8, work_side=64,
                           num_inference_steps=STEPS, seed=1)
    assert result.images[0].size == (64, 64) and result.parameters["extend_top"] == 16
    assert np.array_equal(pixels(result.images[0])[16 + 8:], pixels(image)[8:])
    with pytest.raises(StudioError, match="Feather \\(px\\): must be from 0 to 64"):
        client.erase(image, painted((64, 48), (10, 10, 30, 30)), mask_feather=65)
