"""Variations (variation_seed, variation_strength) on the real tiny text-to-image pipeline, in-process:
the initial noise is the seed's, spherically mixed with the variation seed's, row by row."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sdserve.batch import serve_batch
from sdserve.catalog import CHECKPOINT_DIR
from sdserve.params import image_seeds
from sdserve.pipelines import load_pipeline, slerp

from .samples import assert_same_image, max_pixel_difference

STEPS = 2
BASE = {"num_inference_steps": STEPS, "width": 64, "height": 64, "seed": 21}


@pytest.fixture(scope="module")
def text_to_image(model_repository):
    return load_pipeline("sd_base", model_repository / "sd_base" / "1" / CHECKPOINT_DIR)


def request(**gen_args):
    values = {"prompt": b"a lighthouse", "gen_args": json.dumps({**BASE, **gen_args}).encode()}
    return {name: np.array([[value]], dtype=np.object_) for name, value in values.items()}


def images(answer) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in answer.images[0]]


def make(loaded, **gen_args) -> tuple[Image.Image, dict]:
    [answer] = serve_batch(loaded, [request(**gen_args)])
    return images(answer)[0], json.loads(answer.parameters[0])


@pytest.mark.pipeline
def test_strength_0_is_the_seeds_image_and_1_the_variation_seeds(text_to_image):
    plain, _ = make(text_to_image)
    other, _ = make(text_to_image, seed=77)
    at_zero, parameters = make(text_to_image, variation_seed=77, variation_strength=0.0)
    assert_same_image(at_zero, plain)
    assert parameters["variation_strength"] == 0.0 and parameters["variation_seed"] == 77
    at_one, parameters = make(text_to_image, variation_seed=77, variation_strength=1.0)
    assert_same_image(at_one, other)
    assert (parameters["seed"], parameters["variation_seed"], parameters["variation_strength"]) == (21, 77, 1.0)


@pytest.mark.pipeline
def test_a_variation_differs_from_both_and_reproduces_alone_or_in_a_batch(text_to_image):
    plain, _ = make(text_to_image)
    other, _ = make(text_to_image, seed=77)
    varied, parameters = make(text_to_image, variation_seed=77, variation_strength=0.4)
    assert max_pixel_difference(varied, plain) > 8 and max_pixel_difference(varied, other) > 8
    assert parameters["variation_seeds"] == [77] and parameters["seeds"] == [21]
    # The same request beside a plain one and another variation in one pipeline call.
    answers = serve_batch(text_to_image, [request(), request(variation_seed=77, variation_strength=0.4),
                                          request(variation_seed=5, variation_strength=0.9)])
    assert_same_image(images(answers[0])[0], plain)
    assert_same_image(images(answers[1])[0], varied)


@pytest.mark.pipeline
def test_several_variations_keep_the_seed_and_count_the_variation_seed(text_to_image):
    [answer] = serve_batch(text_to_image, [request(variation_seed=100, variation_strength=0.5, num_images_per_prompt=2)])
    first, second = images(answer)
    parameters = json.loads(answer.parameters[0])
    assert parameters["seeds"] == [21, 21] and parameters["variation_seeds"] == [100, 101]
    assert [json.loads(image.text["parameters"])["variation_seed"] for image in (first, second)] == [100, 101]
    alone, _ = make(text_to_image, variation_seed=101, variation_strength=0.5)
    assert_same_image(second, alone)


@pytest.mark.pipeline
def test_a_random_variation_seed_is_reported_and_reproduces(text_to_image):
    varied, parameters = make(text_to_image, variation_seed=-1, variation_strength=0.3)
    assert 0 <= parameters["variation_seed"] and parameters["variation_seed"] != -1
    again, _ = make(text_to_image, variation_seed=parameters["variation_seed"], variation_strength=0.3)
    assert_same_image(varied, again)


def test_image_seeds_counts_seeds_for_images_and_variation_seeds_for_variations():
    assert image_seeds({"seed": 4, "num_images_per_prompt": 3}, lambda: 0) == [{"seed": 4}, {"seed": 5}, {"seed": 6}]
    assert image_seeds({"seed": -1, "variation_seed": -1, "variation_strength": 0.3, "num_images_per_prompt": 2},
                       lambda: 9) == [{"seed": 9, "variation_seed": 9}, {"seed": 9, "variation_seed": 10}]
    # A variation seed that is not used is not resolved (nor reported per image).
    assert image_seeds({"seed": 4, "variation_seed": -1, "variation_strength": 0.0}, lambda: 9) == [{"seed": 4}]


def test_slerp_keeps_the_ends_exactly_and_the_norm_in_between():
    generator = torch.Generator("cpu")
    start = torch.randn(4, 16, 16, generator=generator.manual_seed(1))
    end = torch.randn(4, 16, 16, generator=generator.manual_seed(2))
    assert torch.equal(slerp(0.0, start, end), start) and torch.equal(slerp(1.0, start, end), end)
    middle = slerp(0.5, start, end)
    # Two independent Gaussian draws are nearly orthogonal: their arc keeps the norm, a straight mix would not.
    assert abs(middle.norm() / start.norm() - 1) < 0.05
    assert abs(((start + end) / 2).norm() / start.norm() - 1) > 0.2
