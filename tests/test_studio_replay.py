"""python -m studio.replay (studio/replay.py) against the real local endpoint (real Triton, the tiny
weights): a 5-step chain made through the client layer, each step fed the previous result
(generate, erase, extend, restyle, upscale), exported, then replayed: every step within the
determinism guarantee. A chain whose original was altered is reported, and fails only --strict."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio import replay
from studio.client import EndpointConfig, StudioClient
from studio.exchange import export_zip, read_zip
from studio.metadata import image_to_png, read_parameters
from studio.session import record_result
from studio.store import ResultStore
from studio.tasks import TASKS

from .endpoint_support import ENDPOINT_NAME, STEPS

OWNER = "designer"
SIDE = 64


@pytest.fixture(scope="module")
def endpoint(shared_endpoint):
    return shared_endpoint


class Chain:
    """Results made through the client layer and kept as the studio keeps them (record_result),
    each step's parent the one before it: the history, newest first."""

    def __init__(self, client: StudioClient, store: ResultStore) -> None:
        self.client, self.store = client, store
        self.history: list[dict] = []
        self.seconds: list[float] = []

    def step(self, task: str, image: Image.Image | None = None, mask: Image.Image | None = None, *,
             prompt: str = "", **values) -> Image.Image:
        result = self.client.run(task, prompt, "", {"num_inference_steps": STEPS, **values}, image=image, mask=mask)
        inputs = {name: value for name, value in (("image", image), ("mask", mask)) if value is not None}
        (entry,) = record_result(self.store, TASKS[task], result, inputs, owner=OWNER)
        entry["parent"] = self.history[0]["id"] if self.history else None
        self.history.insert(0, entry)
        self.seconds.append(result.seconds)
        return result.images[0]

    def png(self, result_id: str) -> bytes | None:
        path = self.store.path(result_id, owner=OWNER)
        return path.read_bytes() if path is not None else None


def painted(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4), fill=255)
    return mask


@pytest.fixture
def client(endpoint) -> StudioClient:
    return StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url, backoff_s=0.2))


@pytest.mark.triton
def test_a_five_step_chain_replays_within_one_level(endpoint, client, tmp_path, capsys):
    chain = Chain(client, ResultStore(tmp_path / "results"))
    made = chain.step("generate", prompt="a lighthouse", width=SIDE, height=SIDE, seed=11)
    made = chain.step("erase", made, painted(made.size), prompt="a boat", seed=12, work_side=SIDE)
    made = chain.step("extend", made, prompt="the sea", seed=13, extend_right=32, work_side=SIDE)
    made = chain.step("restyle", made, prompt="an oil painting", seed=14)
    made = chain.step("upscale", made, prompt="a harbour", seed=15, noise_level=20)
    assert made.size == ((SIDE + 32) * 4, SIDE * 4)

    data = export_zip(chain.history, chain.png)
    zip_path = tmp_path / "session.zip"
    zip_path.write_bytes(data)
    steps = read_zip(zip_path).steps
    assert [step.task for step in steps] == ["generate", "erase", "extend", "restyle", "upscale"]
    assert [step.parent for step in steps] == [None, *(step.id for step in steps[:-1])]

    code = replay.main([str(zip_path), "--endpoint-url", endpoint.url, "--strict"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "largest difference" in line]
    assert code == 0, out
    assert [line.split()[1] for line in lines] == ["generate", "erase", "extend", "restyle", "upscale"]
    assert all(line.endswith("ok") for line in lines), out
    assert "Every step is within the determinism guarantee" in out
    # The figures for the note: export size, and each step's time made and replayed.
    print(f"\nexport of the 5-step chain: {len(data):,} bytes; made in "
          f"{', '.join(f'{seconds:.2f}' for seconds in chain.seconds)} s; replayed:\n" + "\n".join(lines))


@pytest.mark.triton
def test_an_altered_original_is_reported_and_fails_only_strict(endpoint, client, tmp_path, capsys):
    chain = Chain(client, ResultStore(tmp_path / "results"))
    chain.step("generate", prompt="a lighthouse", width=SIDE, height=SIDE, seed=21)

    def altered(result_id: str) -> bytes:
        png = chain.png(result_id)
        with Image.open(io.BytesIO(png)) as image:
            pixels = np.asarray(image.convert("RGB")).astype(np.int16)
        pixels[0, 0] = np.where(pixels[0, 0] < 128, pixels[0, 0] + 5, pixels[0, 0] - 5)  # one pixel, 5 levels off
        return image_to_png(Image.fromarray(pixels.astype(np.uint8), "RGB"), read_parameters(png))

    zip_path = tmp_path / "altered.zip"
    zip_path.write_bytes(export_zip(chain.history, altered))
    assert replay.main([str(zip_path), "--endpoint-url", endpoint.url]) == 0
    out = capsys.readouterr().out
    assert "largest difference 5 of 255  OVER the 1-level guarantee" in out
    assert "1 of 1 steps are not within the determinism guarantee (1 level of 255): step 1." in out
    assert replay.main([str(zip_path), "--endpoint-url", endpoint.url, "--strict"]) == 1


def test_a_zip_the_studio_refuses_is_not_replayed(tmp_path, capsys):
    zip_path = tmp_path / "not.zip"
    zip_path.write_bytes(b"not a zip")
    assert replay.main([str(zip_path), "--endpoint-url", "http://127.0.0.1:9"]) == 2
    assert "not.zip: That file is not a zip" in capsys.readouterr().err
