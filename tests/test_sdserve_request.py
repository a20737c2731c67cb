"""Unit tests of request validation in sdserve: no Triton, no pipeline."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from sdserve.batch import split_rows
from sdserve.budget import RECENT_CALLS, SIZES_KEPT, WorkBudget, megapixels
from sdserve.catalog import MAX_PROMPT_CHARS, MODELS
from sdserve.errors import RequestError
from sdserve.images import MAX_SIDE, decode_image, encode_png
from sdserve.request import parse_request

from .samples import bomb_png_b64, mask_b64, png_b64


def parse_gen_args(model: str, raw):
    return MODELS[model].parse_gen_args(raw)


def expect_error(field: str, call, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args, **kwargs)
    assert caught.value.field == field, str(caught.value)
    assert str(caught.value).startswith(field + ":")
    return caught.value


# --- gen_args -------------------------------------------------------------------------

def test_defaults_are_filled_in():
    args = parse_gen_args("sd_base", None)
    assert args == {argument.name: argument.default for argument in MODELS["sd_base"].arguments}
    assert args["num_inference_steps"] == 50 and args["seed"] == -1


def test_given_values_are_kept_and_ints_accepted_as_floats():
    args = parse_gen_args("sd_depth", json.dumps({"num_inference_steps": 20, "guidance_scale": 8, "strength": 0.5}))
    assert args["num_inference_steps"] == 20
    assert args["guidance_scale"] == 8.0 and isinstance(args["guidance_scale"], float)
    assert args["strength"] == 0.5


@pytest.mark.parametrize(
    "gen_args, field, words",
    [
        ("{not json", "gen_args", "not valid JSON"),
        ("[1, 2]", "gen_args", "JSON object"),
        ('{"eta": 0.5}', "gen_args.eta", "not an accepted argument"),
        ('{"callback": "x"}', "gen_args.callback", "not an accepted argument"),
        ('{"num_inference_steps": "ten"}', "gen_args.num_inference_steps", "must be an integer"),
        ('{"num_inference_steps": 2.5}', "gen_args.num_inference_steps", "must be an integer"),
        ('{"num_inference_steps": true}', "gen_args.num_inference_steps", "boolean"),
        ('{"num_inference_steps": 0}', "gen_args.num_inference_steps", "from 1 to 150"),
        ('{"num_inference_steps": 10000}', "gen_args.num_inference_steps", "from 1 to 150"),
        ('{"guidance_scale": NaN}', "gen_args.guidance_scale", "finite"),
        ('{"guidance_scale": Infinity}', "gen_args.guidance_scale", "finite"),
        ('{"guidance_scale": -1}', "gen_args.guidance_scale", "from 0 to 30"),
        ('{"seed": -2}', "gen_args.seed", "from -1"),
        ('{"seed": 4294967296}', "gen_args.seed", "from -1 to 4294967295"),
        ('{"scheduler": "karras_magic"}', "gen_args.scheduler", "one of default, ddim"),
        ('{"height": 100}', "gen_args.height", "multiple of 8"),
        ('{"width": 4096}', "gen_args.width", "from 64 to 1024"),
        ('{"num_images_per_prompt": 5}', "gen_args.num_images_per_prompt", "from 1 to 4"),
        ('{"variation_seed": -2}', "gen_args.variation_seed", "from -1 to 4294967295"),
        ('{"variation_seed": 4294967296}', "gen_args.variation_seed", "from -1 to 4294967295"),
        ('{"variation_seed": 1.5}', "gen_args.variation_seed", "must be an integer"),
        ('{"variation_seed": true}', "gen_args.variation_seed", "boolean"),
        ('{"variation_strength": 1.5}', "gen_args.variation_strength", "from 0 to 1"),
        ('{"variation_strength": -0.1}', "gen_args.variation_strength", "from 0 to 1"),
        ('{"variation_strength": NaN}', "gen_args.variation_strength", "finite"),
        ('{"variation_strength": "a lot"}', "gen_args.variation_strength", "must be a number"),
    ],
)
def test_bad_gen_args_name_the_key(gen_args, field, words):
    error = expect_error(field, parse_gen_args, "sd_base", gen_args)
    assert words in str(error)


def test_strength_range_and_model_specific_keys():
    assert "from 0 to 1" in str(expect_error("gen_args.strength", parse_gen_args, "sd_depth", '{"strength": 1.5}'))
    # height/width only apply to text-to-image; strength not to the upscaler.
    expect_error("gen_args.height", parse_gen_args, "sd_depth", '{"height": 512}')
    expect_error("gen_args.strength", parse_gen_args, "sd_upscale", '{"strength": 0.5}')
    expect_error("gen_args.noise_level", parse_gen_args, "sd_upscale", '{"noise_level": 351}')
    # Variations are of text-to-image only: the other models start from their input image.
    expect_error("gen_args.variation_seed", parse_gen_args, "sd_inpaint", '{"variation_seed": 3}')
    expect_error("gen_args.variation_strength", parse_gen_args, "sd_depth", '{"variation_strength": 0.5}')


def test_gen_args_size_limit():
    expect_error("gen_args", parse_gen_args, "sd_base", json.dumps({"scheduler": "x" * 5000}))


# --- images ---------------------------------------------------------------------------

def test_decode_round_trip_and_png_text_chunk():
    image = Image.new("RGB", (40, 24), (1, 2, 3))
    encoded = encode_png(image, {"parameters": '{"seed": 7}'})
    decoded = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert decoded.size == (40, 24) and decoded.text["parameters"] == '{"seed": 7}'
    assert decode_image(encoded, "image").getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"%%% not base64 %%%", "not valid base64"),
        (base64.b64encode(b"GIF89a not really an image"), "not a readable image"),
        (base64.b64encode(b"plain text, base64 but no image"), "not a readable image"),
        (b"", "is empty"),
    ],
)
def test_bad_image_bytes(data, words):
    assert words in str(expect_error("image", decode_image, data, "image"))


def test_oversized_sides_are_refused_before_decoding():
    error = expect_error("image", decode_image, png_b64((MAX_SIDE + 8, 16)), "image")
    assert f"{MAX_SIDE} px a side" in str(error)


def test_decompression_bomb_is_refused():
    # 60000 x 60000 is 3.6 G pixels claimed by a few hundred bytes.
    error = expect_error("mask_image", decode_image, bomb_png_b64(60000, 60000), "mask_image")
    assert "px a side" in str(error)


def test_decoded_size_limit():
    too_big = base64.b64encode(b"\x89PNG" + b"\0" * (21 * 1024 * 1024))
    assert "20 MB" in str(expect_error("image", decode_image, too_big, "image"))


# --- typed requests --------------------------------------------------------------------

def test_text_to_image_request():
    request = parse_request("sd_base", {"prompt": b"a red chair", "gen_args": b'{"height": 64, "width": 96}'})
    assert request.prompt == "a red chair" and request.negative_prompt == ""
    assert request.size == (96, 64) and request.image is None


def test_empty_prompt_refused_where_required_only():
    expect_error("prompt", parse_request, "sd_base", {"prompt": b"  "})
    expect_error("prompt", parse_request, "sd_depth", {"prompt": b"", "image": png_b64()})
    # Erasing and upscaling work without words.
    assert parse_request("sd_upscale", {"prompt": b"", "image": png_b64()}).prompt == ""


def test_prompt_limits_and_encoding():
    expect_error("prompt", parse_request, "sd_base", {"prompt": b"\xff\xfe bad"})
    expect_error("negative_prompt", parse_request, "sd_base", {"prompt": b"ok", "negative_prompt": b"x" * (MAX_PROMPT_CHARS + 1)})
    long_prompt = " ".join(["word"] * 500).encode()
    assert parse_request("sd_base", {"prompt": long_prompt}).prompt.count("word") == 500


def test_image_required_and_limits_per_model():
    assert "required for sd_depth" in str(expect_error("image", parse_request, "sd_depth", {"prompt": b"p"}))
    assert "at most 512" in str(expect_error("image", parse_request, "sd_upscale", {"prompt": b"", "image": png_b64((640, 64))}))
    assert "at least 32" in str(expect_error("image", parse_request, "sd_depth", {"prompt": b"p", "image": png_b64((16, 64))}))


def test_images_are_snapped_to_multiples_of_8():
    request = parse_request("sd_depth", {"prompt": b"p", "image": png_b64((100, 75))})
    assert request.size == (96, 72)


def test_inpaint_mask_rules():
    image = png_b64((64, 64))
    expect_error("mask_image", parse_request, "sd_inpaint", {"prompt": b"p", "image": image})
    size_error = expect_error("mask_image", parse_request, "sd_inpaint", {"prompt": b"p", "image": image, "mask_image": mask_b64((32, 32), (0, 0, 8, 8))})
    assert "32x32" in str(size_error) and "64x64" in str(size_error)
    empty = expect_error("mask_image", parse_request, "sd_inpaint", {"prompt": b"p", "image": image, "mask_image": mask_b64(box=(0, 0, 0, 0))})
    assert "empty" in str(empty)
    request = parse_request("sd_inpaint", {"prompt": b"p", "image": png_b64((100, 60)), "mask_image": mask_b64((100, 60))})
    assert request.mask_image.mode == "L" and request.mask_image.size == request.image.size == (96, 56)


def test_batch_keys_group_what_can_share_a_call():
    def key(gen_args, prompt=b"p"):
        return parse_request("sd_base", {"prompt": prompt, "gen_args": json.dumps(gen_args).encode()}).batch_key()

    assert key({"seed": 1}) == key({"seed": 2, "num_images_per_prompt": 3}, prompt=b"other")
    assert key({}) != key({"num_inference_steps": 10})
    assert key({}) != key({"height": 256})
    assert key({}) != key({"scheduler": "ddim"})


# --- rows of a request ------------------------------------------------------------------

def column(*values):
    return np.array([[value] for value in values], dtype=np.object_)


def test_split_rows():
    rows = split_rows({"prompt": column(b"a", b"b"), "gen_args": column(b"{}", b'{"seed": 1}'), "image": None})
    assert [row["prompt"] for row in rows] == [b"a", b"b"]
    assert rows[1]["gen_args"] == b'{"seed": 1}' and rows[0]["image"] is None


def test_split_rows_refuses_bad_shapes():
    expect_error("prompt", split_rows, {"gen_args": column(b"{}")})
    expect_error("gen_args", split_rows, {"prompt": column(b"a", b"b"), "gen_args": column(b"{}")})
    expect_error("prompt", split_rows, {"prompt": np.array([[b"a", b"b"]], dtype=np.object_)})
    expect_error("latents", split_rows, {"prompt": column(b"a"), "latents": column(b"x")})



# --- the work budget -------------------------------------------------------------------------


def test_the_budget_learns_the_step_time_and_the_rest_of_a_call():
    budget = WorkBudget(25)
    assert budget.predict(1.0, 10) is None
    budget.record(0.25, step_ends=[1.0, 9.0, 17.0], started=0.0, ended=30.0)  # the first call warms up
    assert budget.predict(0.25, 10) == pytest.approx(6 + 8 * 10)  # a cautious guess until others come
    # 4 steps of 0.5 s on a quarter megapixel, 1 s of prompt encoding and decoding around them.
    budget.record(0.25, step_ends=[1.0, 1.5, 2.0, 2.5], started=0.0, ended=3.0)
    assert budget.predict(0.25, 10) == pytest.approx(1 + 0.5 * 10)
    # One size known, no slope yet: larger sizes are guessed long (all of a step and of the rest
    # scales with size), smaller ones at the times seen.
    assert budget.predict(1.0, 10) == pytest.approx(4 * 1 + 4 * 0.5 * 10)
    assert budget.predict(0.0625, 10) == pytest.approx(1 + 0.5 * 10)
    # Steps of 1.1 s on a full megapixel: a step costs 0.3 s + 0.8 s a megapixel.
    budget.record(1.0, step_ends=[1.0, 2.1, 3.2], started=0.0, ended=4.3)
    # The rest of both calls took 1 s.
    assert budget.predict(0.5, 10) == pytest.approx(1.0 + (0.3 + 0.8 * 0.5) * 10)
    assert budget.rest_seconds(0.5) == pytest.approx(1.0)
    before = budget.predict(0.25, 10)
    budget.record(0.25, step_ends=[0.0], started=0.0, ended=9.0)  # one step tells nothing
    assert budget.predict(0.25, 10) == pytest.approx(before)


def test_a_refusal_names_what_to_lower_and_the_limit():
    budget = WorkBudget(25, call_overhead_s=1.0)
    budget.steps_seen.extend([(0.5, 1.0), (1.0, 2.0)])  # 2 s a step per megapixel
    args = MODELS["sd_depth"].parse_gen_args('{"num_inference_steps": 50, "strength": 0.5}')
    assert budget.refusal("sd_depth", args, 0.25) is None  # 1 + 2 x 0.25 x 25 steps = 13.5 s
    refused = budget.refusal("sd_depth", args, 1.0)  # 51 s
    assert refused.field == "gen_args" and "about 51 s" in str(refused) and "over the 25 s" in str(refused)
    assert "num_inference_steps (now 50)" in str(refused) and "strength (now 0.5)" in str(refused)
    assert "the image size" in str(refused)
    # Rows of a quarter megapixel, 10 steps: 1 + 2 x 0.25 x n x 10 s for n rows in one call.
    assert budget.rows_that_fit(0.25, 10, remaining_s=25.0, most=8) == 4  # 21 s
    assert budget.rows_that_fit(0.25, 10, remaining_s=5.0, most=8) == 0
    assert budget.rows_that_fit(0.25, 10, remaining_s=1000.0, most=8) == 8
    assert WorkBudget(25).rows_that_fit(0.25, 10, remaining_s=25.0, most=8) == 1  # unmeasured: one first


def test_a_crowd_of_one_size_keeps_what_other_sizes_taught():
    """Many small calls in a row leave the slope that a larger call taught: a 1024 px call that
    the two sizes say is far too long is still refused after them."""
    budget = WorkBudget(25)
    small, larger = megapixels((64, 64)), megapixels((128, 128))
    budget.record(small, step_ends=[0.0, 1.0, 2.0], started=0.0, ended=2.5)  # the warm-up
    budget.record(larger, step_ends=[0.0, 0.3, 0.6], started=0.0, ended=0.7)  # 0.3 s a step
    for _ in range(3 * RECENT_CALLS):
        budget.record(small, step_ends=[0.0, 0.08, 0.16], started=0.0, ended=0.2)  # 0.08 s a step
    args = MODELS["sd_base"].parse_gen_args('{"num_inference_steps": 150, "width": 1024, "height": 1024}')
    refused = budget.refusal("sd_base", args, megapixels((1024, 1024)))
    assert refused is not None and "over the 25 s" in str(refused)
    for size in range(SIZES_KEPT + 1):  # sizes beyond those kept push out the least recently seen
        budget.record(small * (5 + size), step_ends=[0.0, 0.1, 0.2], started=0.0, ended=0.3)
    assert round(larger, 4) not in {size for size, _ in budget.steps_seen.medians()}


def test_one_size_measured_refuses_only_what_is_surely_too_long():
    """Eight 256 px tiles in one call measured 30 s: one tile alone is not refused for it (the
    fixed part may be small), while more rows than that are not risked in one call."""
    budget = WorkBudget(25)
    eight_tiles = 8 * megapixels((256, 256))
    budget.record(eight_tiles, step_ends=[0.0, 10.0, 20.0], started=0.0, ended=40.0)  # the warm-up
    args = MODELS["sd_upscale"].parse_gen_args('{"num_inference_steps": 2}')
    assert budget.refusal("sd_upscale", args, eight_tiles / 8) is None  # known from the warm-up only
    budget.record(eight_tiles, step_ends=[0.0, 10.0, 20.0], started=0.0, ended=30.0)  # 10 s a step, 0 s rest
    assert budget.refusal("sd_upscale", args, eight_tiles / 8) is None  # at least 2.5 s, not surely over
    longer = MODELS["sd_upscale"].parse_gen_args('{"num_inference_steps": 3}')
    assert budget.refusal("sd_upscale", longer, eight_tiles) is not None  # 30 s at least
    assert budget.rows_that_fit(eight_tiles / 8, 2, remaining_s=25.0, most=8) == 8  # 20 s: flat above, all fit
    # 15 s left: a row is not surely too long (at least 2.5 s), so one goes and measures;
    # 2 s left: surely too long.
    assert budget.rows_that_fit(eight_tiles / 8, 2, remaining_s=15.0, most=8) == 1
    assert budget.rows_that_fit(eight_tiles / 8, 2, remaining_s=2.0, most=8) == 0
