"""Real boto3 -> the local endpoint -> the real Triton (SageMaker MME mode) with the tiny models.

One endpoint for the module (loads take several seconds each: every Python-backend stub imports
torch). Tests that need a model no other test has loaded use a copy of an archive under another
TargetModel, so they do not depend on the order the tests run in.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from serving.archive import archive_name
from serving.local_endpoint import EndpointSettings, LocalEndpoint, State
from serving.processes import group_members
from studio.client import EndpointConfig, StudioClient, StudioError

from .endpoint_support import (
    ENDPOINT_NAME,
    EVIL_TRICKS,
    SIZE,
    STEPS,
    HeldCalls,
    answer_image,
    answer_parameters,
    bomb_archive,
    broken_model_archive,
    copy_archive,
    cpu_seconds,
    evil_archive,
    files_below,
    invoke,
    kserve_body,
    listing,
    mask,
    model_info,
    runtime_client,
    scene,
    start_endpoint,
    wait_for,
    wait_until_computing,
)
from .samples import assert_same_image

pytestmark = pytest.mark.triton

MAX_ARCHIVE_GB = 0.05  # ~54 MB: the tiny archives fit, the bomb does not


@pytest.fixture(scope="module")
def endpoint(archive_store, tmp_path_factory, artifacts_dir):
    tmp = tmp_path_factory.mktemp("local-endpoint")
    server = start_endpoint(archive_store, tmp, artifacts_dir, "local-endpoint", max_models=8,
                            max_archive_gb=MAX_ARCHIVE_GB, retry_failed_after_s=600)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def runtime(endpoint):
    return runtime_client(endpoint.url)


@pytest.fixture(scope="module")
def studio(endpoint):
    return StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url, backoff_s=0.2))


def test_ping_and_listing_before_any_call(endpoint):
    assert requests.get(endpoint.url + "/ping", timeout=5).status_code == 200
    info = listing(endpoint)
    assert info["endpoint"] == ENDPOINT_NAME and info["triton"]["running"]
    assert info["limits"]["max_models"] == 8 and info["limits"]["loaded_models"] == 0


# --- the four models through the client layer; first call loads, second is faster ---------------

CALLS = {
    "sd_base": (lambda c: c.generate("a lighthouse at dusk", num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=7),
                (SIZE, SIZE)),
    "sd_depth": (lambda c: c.restyle(scene(), "an oil painting", num_inference_steps=STEPS, strength=0.7, seed=7), (SIZE, SIZE)),
    "sd_inpaint": (lambda c: c.erase(scene(), mask(), "a green plant", num_inference_steps=STEPS, seed=7, work_side=SIZE), (SIZE, SIZE)),
    "sd_upscale": (lambda c: c.upscale(scene(32), "a house", num_inference_steps=STEPS, noise_level=30, seed=7), (128, 128)),
}


@pytest.mark.parametrize("model", list(CALLS))
def test_each_model_through_the_client_layer_loads_once_then_is_faster(endpoint, studio, model):
    call, size = CALLS[model]
    target = archive_name(model)
    assert model_info(endpoint, target).get("state") in (None, "absent")

    first = call(studio)
    after_first = model_info(endpoint, target)
    second = call(studio)

    for result in (first, second):
        assert result.model == model and len(result.images) == 1
        assert result.images[0].size == size
        assert result.parameters["model"] == model
        assert result.parameters["seed"] == 7 and result.parameters["num_inference_steps"] == STEPS
    assert_same_image(first.images[0], second.images[0])  # same seed, same model, same answer
    assert after_first["state"] == "loaded" and after_first["loads"] == 1
    assert after_first["load_seconds"] > 0
    assert 0 <= after_first["archive_seconds"] < after_first["load_seconds"]  # a part: its download and extraction
    assert second.seconds < first.seconds, (first.seconds, second.seconds)
    info = model_info(endpoint, target)
    assert info["loads"] == 1 and info["invocations"] == 2 and info["in_flight"] == 0


def test_eight_concurrent_first_calls_load_once(endpoint, runtime, archive_store):
    target = copy_archive(archive_store, "sd_base", "concurrent/sd_base.tar.gz")
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def call(index: int) -> None:
        barrier.wait()
        try:
            results[index] = invoke(runtime, target, kserve_body(seed=index, width=SIZE + 8 * (index % 2)))
        except Exception as error:  # noqa: BLE001 - checked below
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)

    for index, result in enumerate(results):
        assert not isinstance(result, Exception), result
        response, answer = result
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert answer_image(answer).size == (SIZE + 8 * (index % 2), SIZE)
        assert answer_parameters(answer)["seed"] == index
    info = model_info(endpoint, target)
    assert info["loads"] == 1 and info["invocations"] == 8 and info["state"] == "loaded"
    # Triton saw one load of it (a second POST /models would have been a second stub process).
    assert len(endpoint.triton.stub_pids(endpoint.registry.entry(target).folder)) == 1


def test_response_headers_and_custom_attributes(endpoint, runtime):
    response, answer = invoke(runtime, "sd_base.tar.gz", CustomAttributes="trace-id=abc123")
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    assert response["CustomAttributes"] == "trace-id=abc123"  # echoed: the model sets none
    assert response["ResponseMetadata"]["RequestId"]
    assert answer["model_name"] == "sd_base.tar.gz"  # Triton's model name is the TargetModel
    response, _ = invoke(runtime, "sd_base.tar.gz")
    assert "CustomAttributes" not in response


def test_listing_shows_loaded_models_with_size_and_last_use(endpoint, runtime):
    before = time.time()
    invoke(runtime, "sd_base.tar.gz")
    info = model_info(endpoint, "sd_base.tar.gz")
    entry = endpoint.registry.entry("sd_base.tar.gz")
    assert info["state"] == "loaded"
    # The extracted archive's files (Triton's stub adds __pycache__ folders after the load).
    assert info["size_bytes"] == sum(p.stat().st_size for p in entry.folder.rglob("*")
                                     if p.is_file() and "__pycache__" not in p.parts)
    assert 5e6 < info["size_bytes"] < 50e6
    assert info["last_used_epoch"] >= before - 0.01 and info["last_used"].endswith("Z")
    one = requests.get(endpoint.url + "/models/sd_base.tar.gz", timeout=5).json()
    assert one["target_model"] == "sd_base.tar.gz" and one["size_bytes"] == info["size_bytes"]
    assert requests.get(endpoint.url + "/models/never-seen.tar.gz", timeout=5).status_code == 404


# --- errors in SageMaker's shapes ---------------------------------------------------------------

def test_unknown_target_model_is_a_validation_error(endpoint, runtime, studio):
    with pytest.raises(runtime.exceptions.ValidationError) as caught:
        invoke(runtime, "sd_nothing.tar.gz")
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "sd_nothing.tar.gz" in error["Error"]["Message"]
    assert "Please ensure that there is an object located at the URL" in error["Error"]["Message"]
    with pytest.raises(StudioError, match="refused the request.*sd_nothing"):
        studio.invoke("sd_nothing", {"prompt": "x"}, {})


@pytest.mark.parametrize("target", ["../sd_base.tar.gz", "/etc/passwd", "a/../../b.tar.gz", "./sd_base.tar.gz"])
def test_target_model_outside_the_store_is_refused(endpoint, runtime, target):
    with pytest.raises(runtime.exceptions.ValidationError, match="not a valid model archive name"):
        invoke(runtime, target)


def test_unknown_endpoint_name(endpoint, runtime):
    with pytest.raises(runtime.exceptions.ValidationError,
                       match="Endpoint other-endpoint of account 000000000000 not found"):
        runtime.invoke_endpoint(EndpointName="other-endpoint", TargetModel="sd_base.tar.gz", Body=kserve_body())


def test_missing_target_model(endpoint, runtime):
    with pytest.raises(runtime.exceptions.ValidationError, match="X-Amzn-SageMaker-Target-Model"):
        runtime.invoke_endpoint(EndpointName=ENDPOINT_NAME, Body=kserve_body(), ContentType="application/json")


def test_model_errors_carry_the_original_status_and_message(endpoint, runtime, studio):
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        invoke(runtime, "sd_base.tar.gz", kserve_body(prompt=""))
    response = caught.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert response["OriginalStatusCode"] == 400
    assert json.loads(response["OriginalMessage"]) == {"error": "prompt: must not be empty for sd_base"}
    assert response["LogStreamArn"].startswith("arn:aws:logs:")
    assert 'Received client error (400) from model sd_base.tar.gz with message "prompt: must not be empty' \
        in response["Error"]["Message"]
    # The model's own words reach the designer: sent past the studio's own check of the prompt...
    with pytest.raises(StudioError, match="^prompt: must not be empty for sd_base$"):
        studio.invoke("sd_base", {"prompt": ""}, {"num_inference_steps": STEPS, "width": SIZE, "height": SIZE})
    # ...which refuses the same prompt before sending it.
    with pytest.raises(StudioError, match="^Write a prompt: Generate needs one.$"):
        studio.generate("", num_inference_steps=STEPS, width=SIZE, height=SIZE)
    with pytest.raises(StudioError, match="^Steps: must be from 1 to 150; got 500.$"):
        studio.generate("a cat", num_inference_steps=500, width=SIZE, height=SIZE)


def test_request_body_over_6_mib_is_refused(endpoint, runtime):
    with pytest.raises(runtime.exceptions.ValidationError, match="over invoke_endpoint's limit of 6291456"):
        invoke(runtime, "sd_base.tar.gz", b"x" * (6 * 1024 * 1024 + 1))
    invoke(runtime, "sd_base.tar.gz")  # the connection pool is still usable


def test_model_not_ready_while_loading_then_the_client_retries(endpoint, runtime, archive_store):
    target = copy_archive(archive_store, "sd_base", "slow/sd_base.tar.gz")
    endpoint.registry.limits.load_wait_s = 0.5
    try:
        with pytest.raises(runtime.exceptions.ModelNotReadyException) as caught:
            invoke(runtime, target)
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
        assert "still downloading or loading" in caught.value.response["Error"]["Message"]
        statuses: list[str] = []
        client = StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url,
                                             backoff_s=0.5, max_attempts=30))
        result = client.invoke("slow/sd_base", {"prompt": "a cat"},
                               {"num_inference_steps": STEPS, "width": SIZE, "height": SIZE},
                               on_status=statuses.append)
    finally:
        endpoint.registry.limits.load_wait_s = 180.0
    assert result.images[0].size == (SIZE, SIZE)
    assert any("loading" in status for status in statuses)
    assert model_info(endpoint, target)["loads"] == 1  # the 429s did not start more loads


# --- archives that must not load ------------------------------------------------------------------

def test_corrupt_archive_is_refused_remembered_and_retried_when_it_changes(endpoint, runtime, archive_store):
    target = "corrupt/sd_base.tar.gz"
    path = archive_store / target
    path.parent.mkdir(exist_ok=True)
    good = (archive_store / "sd_base.tar.gz").read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated mid-way
    with pytest.raises(runtime.exceptions.ValidationError, match="valid tar.gz archive") as caught:
        invoke(runtime, target)
    assert "not a readable .tar.gz" in caught.value.response["Error"]["Message"]
    attempts = endpoint.registry.entry(target).attempt

    with pytest.raises(runtime.exceptions.ValidationError, match="valid tar.gz archive"):
        invoke(runtime, target)  # answered from memory, not extracted again
    assert endpoint.registry.entry(target).attempt == attempts
    assert model_info(endpoint, target)["state"] == "failed"

    path.write_bytes(os.urandom(4096))  # still corrupt, but changed: tried again
    with pytest.raises(runtime.exceptions.ValidationError, match="valid tar.gz archive"):
        invoke(runtime, target)
    assert endpoint.registry.entry(target).attempt == attempts + 1

    path.write_bytes(good)  # fixed: loads
    _, answer = invoke(runtime, target)
    assert answer_image(answer).size == (SIZE, SIZE)
    assert not [p for p in endpoint.cache.models.rglob("*.partial")]


@pytest.mark.parametrize("trick", EVIL_TRICKS)
def test_archive_escaping_the_cache_is_refused(endpoint, runtime, archive_store, tmp_path, trick):
    outside = tmp_path / "outside" / "pwned.txt"
    outside.parent.mkdir()
    target = f"evil/{trick.replace(' ', '-')}.tar.gz"
    (archive_store / "evil").mkdir(exist_ok=True)
    evil_archive(archive_store / target, trick, outside)
    cache_before = files_below(endpoint.cache.root)

    with pytest.raises(runtime.exceptions.ValidationError) as caught:
        invoke(runtime, target)
    message = caught.value.response["Error"]["Message"]
    assert message.startswith(f"Refused to extract model data archive file://{archive_store / target}")
    expected = {"absolute path": "absolute path", "dot-dot": "'..' in path", "symlink out": "links are refused",
                "relative symlink out": "links are refused", "hard link out": "links are refused",
                "character device": "not a regular file", "block device": "not a regular file",
                "fifo": "not a regular file"}[trick]
    assert expected in message and "Nothing was written outside the model cache" in message
    assert list(outside.parent.iterdir()) == []
    assert files_below(endpoint.cache.root) == cache_before  # and nothing left inside either
    assert not (Path("/") / str(outside).lstrip("/")).exists()


def test_archive_over_the_size_limit_is_refused(endpoint, runtime, archive_store):
    target = "evil/bomb.tar.gz"
    bomb_archive(archive_store / target, int(MAX_ARCHIVE_GB * 2**30) + 1024 * 1024)
    assert (archive_store / target).stat().st_size < 1024 * 1024  # small packed, huge unpacked
    cache_before = files_below(endpoint.cache.root)
    with pytest.raises(runtime.exceptions.ValidationError, match="archive expands to more than"):
        invoke(runtime, target)
    assert files_below(endpoint.cache.root) == cache_before


def test_archive_without_a_model_folder_is_refused(endpoint, runtime, archive_store):
    import gzip
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("README.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    (archive_store / "evil" / "layout.tar.gz").parent.mkdir(exist_ok=True)
    (archive_store / "evil" / "layout.tar.gz").write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(runtime.exceptions.ValidationError, match="exactly one Triton model folder"):
        invoke(runtime, "evil/layout.tar.gz")


def test_a_model_that_fails_to_load_is_reported_and_not_retried_until_the_cool_down(
        endpoint, runtime, archive_store, studio):
    broken_model_archive(archive_store / "broken.tar.gz")
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        invoke(runtime, "broken.tar.gz")
    response = caught.value.response
    assert response["OriginalStatusCode"] == 400
    assert "the weights are missing" in response["Error"]["Message"]
    assert "could not be loaded" in response["Error"]["Message"]
    entry = endpoint.registry.entry("broken.tar.gz")
    assert entry.state is State.FAILED and entry.attempt == 1

    with pytest.raises(StudioError, match="the weights are missing"):
        studio.invoke("broken", {"prompt": "x"}, {})
    assert entry.attempt == 1  # remembered, not loaded again

    endpoint.registry.limits.retry_failed_after_s = 0.0  # cool-down over: tried once more
    try:
        with pytest.raises(runtime.exceptions.ModelError, match="the weights are missing"):
            invoke(runtime, "broken.tar.gz")
    finally:
        endpoint.registry.limits.retry_failed_after_s = 600
    assert entry.attempt == 2


# --- crashes ---------------------------------------------------------------------------------------

def test_model_process_killed_then_clear_error_then_works_again(endpoint, runtime, studio, archive_store):
    target = copy_archive(archive_store, "sd_base", "crash/sd_base.tar.gz")
    _, before = invoke(runtime, target)
    entry = endpoint.registry.entry(target)
    stubs = endpoint.triton.stub_pids(entry.folder)
    assert len(stubs) == 1
    os.kill(stubs[0], signal.SIGKILL)
    wait_for(lambda: not endpoint.triton.stub_pids(entry.folder), timeout=10)

    with pytest.raises(runtime.exceptions.ModelError) as caught:
        invoke(runtime, target)
    response = caught.value.response
    assert response["OriginalStatusCode"] == 500
    assert "crashed" in response["Error"]["Message"]
    assert "will load it again on the next call" in response["Error"]["Message"]

    _, after = invoke(runtime, target)  # reloaded
    assert answer_parameters(after)["seed"] == answer_parameters(before)["seed"]
    assert_same_image(answer_image(after), answer_image(before))
    info = model_info(endpoint, target)
    assert info["crashes"] == 1 and info["loads"] == 2 and info["state"] == "loaded"
    assert len(endpoint.triton.stub_pids(endpoint.registry.entry(target).folder)) == 1
    # The other models were not disturbed.
    invoke(runtime, "sd_base.tar.gz")
    assert model_info(endpoint, "sd_base.tar.gz")["loads"] == 1

    # Through the client layer: the designer reads that it crashed and will be reloaded.
    os.kill(endpoint.triton.stub_pids(endpoint.registry.entry(target).folder)[0], signal.SIGKILL)
    with pytest.raises(StudioError, match="crashed .* will load it again on the next call"):
        studio.invoke("crash/sd_base", {"prompt": "x"}, {"num_inference_steps": STEPS, "width": SIZE, "height": SIZE})
    assert studio.invoke("crash/sd_base", {"prompt": "x"},
                         {"num_inference_steps": STEPS, "width": SIZE, "height": SIZE}).images


def test_model_process_killed_during_a_call(endpoint, runtime, archive_store):
    target = copy_archive(archive_store, "sd_base", "crash-in-flight/sd_base.tar.gz")
    invoke(runtime, target)
    stub = endpoint.triton.stub_pids(endpoint.registry.entry(target).folder)[0]
    idle = cpu_seconds(stub)
    outcome: dict = {}

    def long_call() -> None:
        try:
            outcome["answer"] = invoke(runtime, target, kserve_body(num_inference_steps=150, width=128, height=128))
        except Exception as error:  # noqa: BLE001 - checked below
            outcome["error"] = error

    thread = threading.Thread(target=long_call)
    thread.start()
    assert wait_for(lambda: endpoint.registry.entry(target).in_flight == 1, timeout=10)
    wait_until_computing(stub, since=idle)  # killed while it computes the call
    os.kill(stub, signal.SIGKILL)
    thread.join(120)
    assert isinstance(outcome.get("error"), runtime.exceptions.ModelError), outcome
    assert "crashed" in str(outcome["error"])
    _, answer = invoke(runtime, target)  # the next call already finds it reloaded
    assert answer_image(answer).size == (SIZE, SIZE)


def test_tritonserver_killed_then_restarted(endpoint, runtime, studio, archive_store):
    invoke(runtime, "sd_base.tar.gz")
    broken = "broken-before-a-restart.tar.gz"
    broken_model_archive(archive_store / broken)
    with pytest.raises(runtime.exceptions.ModelError):
        invoke(runtime, broken)
    assert endpoint.registry.entry(broken).state is State.FAILED  # remembered
    old_pid = endpoint.triton.pid
    starts = listing(endpoint)["triton"]["starts"]
    os.kill(old_pid, signal.SIGKILL)
    try:
        invoke(runtime, "sd_base.tar.gz")  # the watchdog may already have restarted it
    except runtime.exceptions.InternalFailure as error:
        assert "The model server stopped" in str(error) and "restarting" in str(error)
    except runtime.exceptions.ModelNotReadyException as error:
        assert "restarting" in str(error)
    result = studio.generate("a cat", num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=3)  # retries while it restarts
    assert result.images[0].size == (SIZE, SIZE)
    info = listing(endpoint)
    assert info["triton"]["starts"] == starts + 1 and info["triton"]["pid"] != old_pid
    assert wait_for(lambda: group_members(old_pid) == [], timeout=15)
    assert requests.get(endpoint.url + "/ping", timeout=5).status_code == 200
    # A new model server: the load that failed on the old one is tried again, not answered from memory.
    assert endpoint.registry.entry(broken).state is State.ABSENT
    with pytest.raises(runtime.exceptions.ModelError, match="the weights are missing"):
        invoke(runtime, broken)
    assert endpoint.registry.entry(broken).attempt == 2


def test_client_timeout_sends_the_request_once(endpoint, runtime, monkeypatch):
    invoke(runtime, "sd_base.tar.gz")  # loaded
    held = HeldCalls(endpoint, monkeypatch)  # still in flight when the client stops waiting, on any machine
    client = StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url, read_timeout_s=1))
    before = endpoint.invocations_total
    try:
        with pytest.raises(StudioError, match="The endpoint did not answer within 1 s"):
            client.generate("a slow one", num_inference_steps=STEPS, width=SIZE, height=SIZE)
        assert endpoint.invocations_total - before == 1  # botocore did not send it again
    finally:
        held.release.set()
    wait_for(lambda: endpoint.registry.entry("sd_base.tar.gz").in_flight == 0, timeout=120)


# --- SageMaker's real-time limits, enforced as SageMaker enforces them -----------------------------


def test_the_defaults_are_sagemakers_limits():
    settings = EndpointSettings()
    assert settings.invoke_timeout_s == 60 and settings.max_answer_bytes == 6_291_456


@pytest.fixture(scope="module")
def strict_endpoint(archive_store, tmp_path_factory, artifacts_dir):
    """An endpoint whose answer limit holds one 64 px image but not four, whose invocation limit
    is 8 s (a 150-step call at 128 px runs longer), and whose models compute with one thread."""
    endpoint = start_endpoint(archive_store, tmp_path_factory.mktemp("strict"), artifacts_dir, "strict-endpoint",
                              max_answer_bytes=40_000, invoke_timeout_s=8, compute_threads=2)
    yield endpoint
    endpoint.stop()


def test_an_answer_over_the_limit_is_a_model_error_413_and_the_next_is_served(strict_endpoint):
    runtime = runtime_client(strict_endpoint.url)
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        invoke(runtime, "sd_base.tar.gz", kserve_body(num_images_per_prompt=4))
    error = caught.value.response
    assert error["OriginalStatusCode"] == 413
    assert "could not load the entire response body" in error["Error"]["Message"]
    assert "over InvokeEndpoint's limit of 40000 bytes" in error["Error"]["Message"]
    _, answer = invoke(runtime, "sd_base.tar.gz", kserve_body())  # one image fits
    assert answer_image(answer).size == (SIZE, SIZE)


def test_an_invocation_over_the_time_limit_is_a_model_error_and_the_endpoint_goes_on(strict_endpoint, archive_store):
    runtime = runtime_client(strict_endpoint.url)
    invoke(runtime, "sd_depth.tar.gz", image_body())  # loaded, so only the call is timed
    # A model of its own that has made one call (loaded and warmed up, its speed not yet known),
    # so the serving side runs the long call rather than refusing it.
    slow = copy_archive(archive_store, "sd_base", "timeout/sd_base.tar.gz")
    invoke(runtime, slow)
    started = time.monotonic()
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        invoke(runtime, slow, kserve_body(num_inference_steps=150, width=128, height=128))
    assert time.monotonic() - started >= 8, "answered before the invocation limit ran out"
    error = caught.value.response
    assert error["OriginalStatusCode"] == 0
    assert f"Your invocation timed out while waiting for a response from model {slow}" in error["Error"]["Message"]
    assert "the 8 s an invocation may take" in error["Error"]["Message"]
    _, answer = invoke(runtime, "sd_depth.tar.gz", image_body())  # another model answers at once
    assert answer_image(answer).size == (SIZE, SIZE)


def test_compute_threads_reach_the_model_processes(strict_endpoint):
    runtime = runtime_client(strict_endpoint.url)
    invoke(runtime, "sd_base.tar.gz", kserve_body())
    (stub,) = strict_endpoint.triton.stub_pids(strict_endpoint.registry.entry("sd_base.tar.gz").folder)
    # torch sizes its thread pool from this variable when the stub imports it (the suite runs with 1),
    # and its waiting threads sleep rather than spin on the machine the stub shares.
    environ = Path(f"/proc/{stub}/environ").read_bytes().split(b"\0")
    assert b"OMP_NUM_THREADS=2" in environ and b"OMP_WAIT_POLICY=PASSIVE" in environ


def test_compute_threads_below_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match="compute_threads must be at least 1"):
        LocalEndpoint(EndpointSettings(compute_threads=0, log_dir=tmp_path))


def image_body() -> bytes:
    buffer = io.BytesIO()
    scene().save(buffer, format="PNG")
    values = {"prompt": "a house", "image": base64.b64encode(buffer.getvalue()).decode(),
              "gen_args": json.dumps({"num_inference_steps": STEPS, "seed": 1})}
    return json.dumps({"inputs": [{"name": n, "shape": [1, 1], "datatype": "BYTES", "data": [v]}
                                  for n, v in values.items()]}).encode()
