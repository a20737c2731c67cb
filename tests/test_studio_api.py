"""The studio's API endpoints through gradio_client, against `python -m studio` on a local
endpoint (real Triton, tiny weights): the worker's shared one.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from studio.edits import feathered_mask
from studio.metadata import read_parameters
from studio.process import StudioProcess

from .samples import assert_same_image, max_pixel_difference

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 600  # the first start of Triton on a busy 2-core machine
TINY = {"num_inference_steps": 2, "guidance_scale": 5.0}

pytestmark = [pytest.mark.studio, pytest.mark.triton]


@contextlib.contextmanager
def launched_studio(results_dir: Path, *flags: str) -> Iterator[str]:
    """`python -m studio` on a free port with no endpoint configured (unless `flags` give one);
    its URL while it runs."""
    with StudioProcess("--results-dir", str(results_dir), *flags, startup_timeout_s=STARTUP_TIMEOUT_S) as studio:
        yield studio.url


@pytest.fixture(scope="module")
def studio_url(shared_endpoint, tmp_path_factory) -> Iterator[str]:
    # The worker's shared local endpoint, its models warm (the studio starting its own is
    # test_studio_endpoint's and test_browser_studio's). This module's tests send more jobs a
    # minute than a designer's default quota (quotas have their own tests).
    with launched_studio(tmp_path_factory.mktemp("studio-results"), "--jobs-per-minute", "1000",
                         "--endpoint-url", shared_endpoint.url) as url:
        yield url


@pytest.fixture(scope="module")
def client(studio_url) -> Client:
    return Client(studio_url, verbose=False)


def picture(path: Path, size=(64, 64)) -> Path:
    Image.open(ROOT / "assets" / "sample.png").convert("RGB").resize(size).save(path)
    return path


def mask(path: Path, size=(64, 64), painted=True) -> Path:
    image = Image.open(ROOT / "assets" / "sample_mask.png").convert("L").resize(size, Image.Resampling.NEAREST)
    (image if painted else Image.new("L", size, 0)).save(path)
    return path


def dot(path: Path, size=(64, 64)) -> Path:
    image = Image.new("L", size, 0)
    image.paste(255, (30, 30, 34, 34))
    image.save(path)
    return path


def only_image(result) -> tuple[Path, dict]:
    """(the one image's file, the parameters it carries) from an endpoint's (gallery, parameters)."""
    gallery, parameters = result
    assert len(gallery) == 1
    path = Path(gallery[0]["image"])
    embedded = read_parameters(path.read_bytes())
    assert embedded is not None, "the PNG carries no parameters"
    assert embedded["seed"] == parameters["seed"] and embedded["model"] == parameters["model"]
    return path, embedded


def test_the_five_endpoints_are_named_and_documented(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    # Besides the tabs: restoring a PNG, importing a session zip, the endpoint panel's figures and
    # the warm-up "Send to" fires.
    assert set(endpoints) == {"/generate", "/restyle", "/erase", "/extend", "/upscale", "/restore", "/import",
                              "/endpoint_status", "/warm_up"}
    names = {endpoint: [p["parameter_name"] for p in info["parameters"]] for endpoint, info in endpoints.items()}
    assert names["/erase"][:3] == ["image", "mask", "prompt"]
    assert {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "seed", "num_images_per_prompt"} <= set(names["/generate"])
    assert "width" in names["/generate"] and "noise_level" in names["/upscale"] and "strength" in names["/restyle"]
    assert {"variation_seed", "variation_strength"} <= set(names["/generate"])
    assert {"mask_grow", "mask_feather", "only_masked", "work_side"} <= set(names["/erase"])
    assert names["/extend"][:2] == ["image", "prompt"] and "extend_right" in names["/extend"]
    assert all(info["description"] for info in endpoints.values())


def test_generate_reports_the_effective_seed_and_reproduces_with_it(client):
    first, parameters = only_image(client.predict(prompt="a red house", width=64, height=64, seed=-1, api_name="/generate", **TINY))
    assert parameters["model"] == "sd_base" and parameters["weights"] == "tiny-random"
    assert parameters["seed"] >= 0 and (parameters["width"], parameters["height"]) == (64, 64)
    again, _ = only_image(
        client.predict(prompt="a red house", width=64, height=64, seed=parameters["seed"], api_name="/generate", **TINY)
    )
    assert_same_image(Image.open(first), Image.open(again))


def test_each_task_takes_the_previous_result(client, tmp_path):
    """Generate -> Erase -> Restyle -> Upscale, each result (a history entry's PNG) feeding the next."""
    made, _ = only_image(client.predict(prompt="a house on a hill", width=64, height=64, api_name="/generate", **TINY))
    erased, parameters = only_image(
        client.predict(image=handle_file(made), mask=handle_file(mask(tmp_path / "mask.png")), prompt="a tree", api_name="/erase", work_side=64, **TINY)
    )
    assert parameters["model"] == "sd_inpaint" and Image.open(erased).size == (64, 64)
    restyled, parameters = only_image(
        client.predict(image=handle_file(erased), prompt="a watercolor", strength=0.7, api_name="/restyle", **TINY)
    )
    assert parameters["model"] == "sd_depth" and parameters["strength"] == 0.7
    upscaled, parameters = only_image(
        client.predict(image=handle_file(restyled), prompt="a watercolor", noise_level=30, api_name="/upscale", **TINY)
    )
    assert parameters["model"] == "sd_upscale" and parameters["noise_level"] == 30
    assert Image.open(upscaled).size == (256, 256)


def test_several_images_each_carry_their_own_seed(client):
    gallery, parameters = client.predict(
        prompt="a boat", width=64, height=64, seed=10, num_images_per_prompt=2, api_name="/generate", **TINY
    )
    seeds = [read_parameters(Path(item["image"]).read_bytes())["seed"] for item in gallery]
    assert seeds == parameters["seeds"] == [10, 11]


def test_variations_go_from_the_seeds_image_to_the_variation_seeds(client):
    def make(**arguments):
        return only_image(client.predict(prompt="a red house", width=64, height=64, api_name="/generate",
                                         **{"seed": 31, **arguments}, **TINY))

    plain, _ = make()
    other, _ = make(seed=32)
    at_zero, _ = make(variation_seed=32, variation_strength=0.0)
    at_one, _ = make(variation_seed=32, variation_strength=1.0)
    varied, parameters = make(variation_seed=32, variation_strength=0.3)
    assert_same_image(Image.open(at_zero), Image.open(plain))
    assert_same_image(Image.open(at_one), Image.open(other))
    assert max_pixel_difference(Image.open(varied), Image.open(plain)) > 8
    assert max_pixel_difference(Image.open(varied), Image.open(other)) > 8
    assert (parameters["seed"], parameters["variation_seed"], parameters["variation_strength"]) == (31, 32, 0.3)
    again, _ = make(variation_seed=32, variation_strength=0.3)
    assert_same_image(Image.open(again), Image.open(varied))


def test_erase_and_extend_leave_every_pixel_outside_the_mask_as_it_was(client, tmp_path):
    source = picture(tmp_path / "wide.png", (160, 96))
    painted = Image.new("L", (160, 96), 0)
    painted.paste(255, (100, 30, 140, 70))
    painted.save(tmp_path / "painted.png")
    erased, parameters = only_image(client.predict(
        image=handle_file(source), mask=handle_file(tmp_path / "painted.png"), prompt="a window",
        mask_grow=2, mask_feather=4, work_side=64, seed=3, api_name="/erase", **TINY))
    alpha = np.asarray(feathered_mask(painted, grow=2, feather=4))
    before, after = np.asarray(Image.open(source).convert("RGB")), np.asarray(Image.open(erased).convert("RGB"))
    assert after.shape == before.shape and np.array_equal(after[alpha == 0], before[alpha == 0])
    assert (after[alpha == 255] != before[alpha == 255]).any()
    assert (parameters["task"], parameters["mask_grow"], parameters["mask_feather"]) == ("erase", 2, 4)

    extended, parameters = only_image(client.predict(
        image=handle_file(source), prompt="more wall", extend_left=32, extend_overlap=8, work_side=64, seed=3,
        api_name="/extend", **TINY))
    after = np.asarray(Image.open(extended).convert("RGB"))
    assert after.shape == (96, 192, 3) and np.array_equal(after[:, 32 + 8:], before[:, 8:])
    assert (parameters["task"], parameters["extend_left"], parameters["width"]) == ("extend", 32, 192)


@pytest.mark.parametrize(
    "endpoint, inputs, message",
    [
        ("/restyle", {"prompt": "x"}, "needs an input image"),
        ("/upscale", {}, "needs an input image"),
        ("/erase", {"image": "picture", "mask": "empty mask"}, "The mask is empty"),
        ("/erase", {"image": "picture"}, "The mask is empty"),
        ("/erase", {"image": "picture", "mask": "small mask"}, "must be the same size"),
        ("/upscale", {"image": "huge picture"}, "at most 1024 px a side"),  # larger ones are tiled
        ("/restyle", {"image": "huge picture", "prompt": "x"}, "at most 1024 px a side"),
        ("/generate", {"prompt": ""}, "Write a prompt"),
        ("/extend", {"image": "picture"}, "at least one side"),
        ("/extend", {"image": "large picture", "extend_left": 512}, "would be 1112×600 px; Extend makes at most 1024 px"),
        ("/erase", {"image": "picture", "mask": "small dot", "mask_grow": -8}, "empty after shrinking it by 8 px"),
        ("/generate", {"prompt": "x", "width": 4096}, "Value 4096 is greater than maximum value 1024"),  # Gradio checks sliders
    ],
)
def test_bad_inputs_get_a_clear_message(client, tmp_path, endpoint, inputs, message):
    files = {
        "picture": lambda: picture(tmp_path / "picture.png"),
        "large picture": lambda: picture(tmp_path / "large.png", (600, 600)),
        "huge picture": lambda: picture(tmp_path / "huge.png", (1100, 1100)),
        "empty mask": lambda: mask(tmp_path / "empty.png", painted=False),
        "small mask": lambda: mask(tmp_path / "small.png", (32, 32)),
        "small dot": lambda: dot(tmp_path / "dot.png"),
    }
    arguments = {name: handle_file(files[value]()) if value in files else value for name, value in inputs.items()}
    with pytest.raises(AppError) as raised:
        client.predict(api_name=endpoint, **TINY, **arguments)
    assert message in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_a_prompt_over_the_tables_limit_is_refused_in_words_before_it_is_sent(client):
    # The studio checks the prompt's length at its door with the server's own limit (the table's),
    # so a stranger's megabyte of prompt is never planned or sent; the server's refusal of the
    # same is test_sdserve_request's.
    with pytest.raises(AppError) as raised:
        client.predict(prompt="x" * 4001, width=64, height=64, api_name="/generate", **TINY)
    assert "Prompt: at most 4,000 characters; got 4,001." in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_the_page_is_served(studio_url):
    with urllib.request.urlopen(studio_url, timeout=10) as response:
        page = response.read().decode()
    assert "SD Studio" in page
