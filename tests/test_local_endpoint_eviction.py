"""The local endpoint's budget: at most N models (or M GB) loaded, least recently used evicted,
never one with a call in flight. Real boto3 / the studio client -> endpoint -> real Triton."""

from __future__ import annotations

import threading
import time

import pytest

from serving.archive import archive_name
from serving.local_endpoint import State
from studio.client import EndpointConfig, StudioClient

from .endpoint_support import (
    ENDPOINT_NAME,
    SIZE,
    STEPS,
    HeldCalls,
    answer_image,
    copy_archive,
    invoke,
    kserve_body,
    listing,
    mask,
    model_info,
    runtime_client,
    scene,
    start_endpoint,
    wait_for,
)
from .samples import assert_same_image

pytestmark = pytest.mark.triton

MODELS = ["sd_base", "sd_depth", "sd_inpaint", "sd_upscale"]


def call(client: StudioClient, model: str):
    common = {"num_inference_steps": STEPS, "seed": 11}
    if model == "sd_base":
        return client.generate("a red bicycle", width=SIZE, height=SIZE, **common)
    if model == "sd_depth":
        return client.restyle(scene(), "a watercolour", **common)
    if model == "sd_inpaint":
        return client.erase(scene(), mask(), "a cat", work_side=SIZE, **common)  # the tiny model at its own size
    return client.upscale(scene(32), "a house", **common)


EXPECTED_SIZE = {"sd_base": (SIZE, SIZE), "sd_depth": (SIZE, SIZE), "sd_inpaint": (SIZE, SIZE),
                 "sd_upscale": (128, 128)}


@pytest.fixture(scope="module")
def endpoint(archive_store, tmp_path_factory, artifacts_dir):
    tmp = tmp_path_factory.mktemp("local-endpoint-eviction")
    server = start_endpoint(archive_store, tmp, artifacts_dir, "local-endpoint-eviction", max_models=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def studio(endpoint):
    return StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url))


def loaded(endpoint) -> dict[str, dict]:
    return {m["target_model"]: m for m in listing(endpoint)["models"] if m["state"] == "loaded"}


def unpacked_size(archive) -> int:
    """What the endpoint counts for a model: the bytes of its extracted files."""
    import tarfile

    with tarfile.open(archive) as tar:
        return sum(member.size for member in tar.getmembers() if member.isreg())


def live_stubs(endpoint) -> int:
    return sum(len(endpoint.triton.stub_pids(e.folder)) for e in
               (endpoint.registry.entry(t) for t in [archive_name(m) for m in MODELS]) if e and e.folder)


def test_cycling_four_models_with_a_budget_of_two_evicts_and_reloads(endpoint, studio):
    first_answers: dict = {}
    for round_ in (1, 2):
        for model in MODELS:
            result = call(studio, model)
            assert result.model == model and result.parameters["model"] == model
            assert result.images[0].size == EXPECTED_SIZE[model]
            assert result.parameters["seed"] == 11
            if round_ == 1:
                first_answers[model] = result
            else:  # reloaded, same answer (within the project's one-level guarantee)
                assert_same_image(result.images[0], first_answers[model].images[0])
                assert result.parameters == first_answers[model].parameters
            now_loaded = loaded(endpoint)
            assert archive_name(model) in now_loaded
            assert len(now_loaded) <= 2, now_loaded
            assert listing(endpoint)["limits"]["loaded_models"] <= 2
            # Evicted models really left Triton: their stub processes end.
            assert wait_for(lambda: live_stubs(endpoint) <= 2, timeout=20), live_stubs(endpoint)
    infos = {m: model_info(endpoint, archive_name(m)) for m in MODELS}
    for model, info in infos.items():
        assert info["loads"] == 2, (model, info)
        assert info["invocations"] == 2
    assert [infos[m]["evictions"] for m in MODELS] == [2, 2, 1, 1]
    assert set(loaded(endpoint)) == {"sd_inpaint.tar.gz", "sd_upscale.tar.gz"}


def test_the_least_recently_used_model_is_the_one_evicted(endpoint, studio):
    # inpaint and upscale loaded, inpaint used last; then base needs a slot: upscale goes.
    call(studio, "sd_upscale")
    call(studio, "sd_inpaint")
    loads_before = model_info(endpoint, "sd_inpaint.tar.gz")["loads"]
    call(studio, "sd_base")
    assert set(loaded(endpoint)) == {"sd_inpaint.tar.gz", "sd_base.tar.gz"}
    assert model_info(endpoint, "sd_inpaint.tar.gz")["loads"] == loads_before
    assert model_info(endpoint, "sd_upscale.tar.gz")["state"] == "absent"


def test_a_gigabyte_budget_is_kept(endpoint, studio, archive_store):
    sizes = {m: unpacked_size(archive_store / archive_name(m)) for m in MODELS}
    two_largest = sum(sorted(sizes.values())[-2:])
    assert sum(sorted(sizes.values())[:3]) > two_largest  # so any two fit and no three
    limits = endpoint.registry.limits
    limits.max_models, limits.max_bytes = None, two_largest
    try:
        for model in ("sd_depth", "sd_upscale", "sd_base"):
            result = call(studio, model)
            assert result.images[0].size == EXPECTED_SIZE[model]
            usage = listing(endpoint)["limits"]
            assert usage["loaded_bytes"] <= two_largest and usage["loaded_models"] <= 2
        assert set(loaded(endpoint)) == {"sd_upscale.tar.gz", "sd_base.tar.gz"}

        # A model larger than the whole budget is refused, without evicting anything.
        limits.max_bytes = 1024 * 1024
        runtime = runtime_client(endpoint.url)
        target = copy_archive(archive_store, "sd_base", "too-big/sd_base.tar.gz")
        with pytest.raises(runtime.exceptions.ValidationError, match="more than the endpoint may load at once"):
            invoke(runtime, target)
        assert set(loaded(endpoint)) == {"sd_upscale.tar.gz", "sd_base.tar.gz"}
    finally:
        limits.max_models, limits.max_bytes = 2, None


def test_a_model_with_a_call_in_flight_is_never_evicted(endpoint, archive_store, monkeypatch):
    runtime = runtime_client(endpoint.url)
    limits = endpoint.registry.limits
    limits.max_models = 1
    held = None
    try:
        busy = "sd_base.tar.gz"
        invoke(runtime, busy)
        # A lowered budget applies from the next load on: any other model still loaded (idle)
        # goes first, then the load waits for the busy one.
        assert busy in loaded(endpoint)
        held = HeldCalls(endpoint, monkeypatch)  # the busy call stays in flight until released
        outcome: dict = {}

        def busy_call() -> None:
            try:
                outcome["answer"] = invoke(runtime, busy, kserve_body(width=96, height=96))
            except Exception as error:  # noqa: BLE001 - checked below
                outcome["error"] = error
            outcome["ended"] = time.time()

        thread = threading.Thread(target=busy_call)
        thread.start()
        assert held.arrived.wait(60) and endpoint.registry.entry(busy).in_flight == 1
        depth: dict = {}
        needs_the_slot = threading.Thread(target=lambda: depth.update(
            answer=invoke(runtime, "sd_depth.tar.gz", _depth_body())[1]))
        needs_the_slot.start()
        assert wait_for(lambda: getattr(endpoint.registry.entry("sd_depth.tar.gz"), "state", None) is State.LOADING,
                        timeout=60)
        # The idle models go as sd_depth's load begins (an unload takes a moment); sd_depth then
        # waits for the slot, and the busy model stays.
        assert wait_for(lambda: set(loaded(endpoint)) == {busy}, timeout=60), loaded(endpoint)
        held.release.set()
        thread.join(300)
        needs_the_slot.join(300)
        assert "error" not in outcome, outcome
        assert answer_image(outcome["answer"][1]).size == (96, 96)
        answer = depth["answer"]
        assert answer_image(answer).size == (SIZE, SIZE)
        # sd_depth's load (which evicted sd_base) finished only after the busy call had ended.
        assert endpoint.registry.entry("sd_depth.tar.gz").loaded_at >= outcome["ended"] - 0.5
        assert set(loaded(endpoint)) == {"sd_depth.tar.gz"}
        assert model_info(endpoint, busy)["evictions"] >= 1
    finally:
        if held is not None:
            held.release.set()
        limits.max_models = 2


def _depth_body() -> bytes:
    import base64
    import io
    import json

    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    inputs = {"prompt": "a watercolour", "image": base64.b64encode(buffer.getvalue()).decode(),
              "gen_args": json.dumps({"num_inference_steps": STEPS, "seed": 1})}
    return json.dumps({"inputs": [{"name": n, "shape": [1, 1], "datatype": "BYTES", "data": [v]}
                                  for n, v in inputs.items()]}).encode()
