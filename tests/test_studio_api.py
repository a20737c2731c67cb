"""The studio's four API endpoints through gradio_client, against `python -m studio` as `make demo`
runs it: the studio starts the checkout's local endpoint (real Triton, tiny weights) itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from serving.local_triton import find_free_port
from studio.metadata import read_parameters

from .samples import assert_same_image

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 600  # the first start of Triton on a busy 2-core machine
TINY = {"num_inference_steps": 2, "guidance_scale": 5.0}

pytestmark = pytest.mark.triton


@contextlib.contextmanager
def launched_studio(results_dir: Path) -> Iterator[str]:
    """`python -m studio` on a free port with no endpoint configured; its URL while it runs."""
    port = find_free_port()
    env = {name: value for name, value in os.environ.items() if name not in ("STUDIO_ENDPOINT_URL", "STUDIO_ENDPOINT_NAME")}
    process = subprocess.Popen(
        [sys.executable, "-m", "studio", "--port", str(port), "--results-dir", str(results_dir)], cwd=ROOT, env=env
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers(url):
            assert process.poll() is None, f"python -m studio exited with {process.returncode} while starting"
            assert time.monotonic() < deadline, f"the studio did not come up within {STARTUP_TIMEOUT_S} s"
            time.sleep(1)
        yield url
    finally:
        process.terminate()  # the studio stops its local endpoint on SIGTERM
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def studio_url(model_repository, tmp_path_factory) -> Iterator[str]:
    with launched_studio(tmp_path_factory.mktemp("studio-results")) as url:
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


def only_image(result) -> tuple[Path, dict]:
    """(the one image's file, the parameters it carries) from an endpoint's (gallery, parameters)."""
    gallery, parameters = result
    assert len(gallery) == 1
    path = Path(gallery[0]["image"])
    embedded = read_parameters(path.read_bytes())
    assert embedded is not None, "the PNG carries no parameters"
    assert embedded["seed"] == parameters["seed"] and embedded["model"] == parameters["model"]
    return path, embedded


def test_the_four_endpoints_are_named_and_documented(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/generate", "/restyle", "/erase", "/upscale", "/restore"}
    names = {endpoint: [p["parameter_name"] for p in info["parameters"]] for endpoint, info in endpoints.items()}
    assert names["/erase"][:3] == ["image", "mask", "prompt"]
    assert {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "seed", "num_images_per_prompt"} <= set(names["/generate"])
    assert "width" in names["/generate"] and "noise_level" in names["/upscale"] and "strength" in names["/restyle"]
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
        client.predict(image=handle_file(made), mask=handle_file(mask(tmp_path / "mask.png")), prompt="a tree", api_name="/erase", **TINY)
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
    }
    arguments = {name: handle_file(files[value]()) if value in files else value for name, value in inputs.items()}
    with pytest.raises(AppError) as raised:
        client.predict(api_name=endpoint, **TINY, **arguments)
    assert message in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_a_refusal_from_the_endpoint_comes_through_in_its_words(client):
    # The prompt length limit is checked by the endpoint only, so this goes through the client layer.
    with pytest.raises(AppError) as raised:
        client.predict(prompt="x" * 4001, width=64, height=64, api_name="/generate", **TINY)
    assert "4000 character limit" in str(raised.value)
    assert "Traceback" not in str(raised.value)


def test_the_page_is_served(studio_url):
    with urllib.request.urlopen(studio_url, timeout=10) as response:
        page = response.read().decode()
    assert "SD Studio" in page
