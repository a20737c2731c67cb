"""`python -m serving.local_endpoint` as `make endpoint` and the studio run it: a subprocess that
builds the archives, answers /ping, serves boto3, logs one line per request and stops its
tritonserver on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import botocore.config
import pytest
import requests

from serving.processes import find_free_port, group_members

from .endpoint_support import (
    SIZE,
    answer_image,
    cpu_seconds,
    kserve_body,
    wait_for,
    wait_until_computing,
)

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
SECRET = "LOCALSECRETKEY-never-logged"
KEY_ID = "AKIDLOCALTESTKEY"
PROMPT = "a very particular prompt that must not be logged"


def run_endpoint(tmp: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "serving.local_endpoint", "--port", str(port),
         "--model-store", str(tmp / "store"), "--cache-dir", str(tmp / "cache"), "--log-dir", str(tmp / "logs"),
         *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pings(url: str) -> bool:
    try:
        return requests.get(url + "/ping", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_help():
    result = subprocess.run([sys.executable, "-m", "serving.local_endpoint", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--port", "--model-store", "--s3-endpoint-url", "--cache-dir", "--max-models", "--max-gb",
                 "--build-from", "--endpoint-name"):
        assert flag in result.stdout


def test_serves_boto3_logs_one_line_per_request_and_stops_triton(model_repository, tmp_path):
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    process = run_endpoint(tmp_path, port, "--build-from", str(model_repository), "--max-models", "1")
    try:
        assert wait_for(lambda: pings(url) or process.poll() is not None, timeout=180)
        assert process.poll() is None, process.stdout.read()
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
            "sd_base.tar.gz", "sd_depth.tar.gz", "sd_inpaint.tar.gz", "sd_upscale.tar.gz"]

        runtime = boto3.session.Session(
            region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
        ).client("sagemaker-runtime", endpoint_url=url,
                 config=botocore.config.Config(read_timeout=300, retries={"total_max_attempts": 1}))
        response = runtime.invoke_endpoint(EndpointName="sd-studio", TargetModel="sd_base.tar.gz",
                                           ContentType="application/json", Body=kserve_body(PROMPT))
        assert answer_image(json.loads(response["Body"].read())).size == (SIZE, SIZE)
        with pytest.raises(runtime.exceptions.ValidationError):
            runtime.invoke_endpoint(EndpointName="sd-studio", TargetModel="nothing.tar.gz", Body=b"{}")
        models = requests.get(url + "/models", timeout=5).json()
        triton_pid = models["triton"]["pid"]
        assert [m["target_model"] for m in models["models"] if m["state"] == "loaded"] == ["sd_base.tar.gz"]
        assert models["limits"]["max_models"] == 1
        assert group_members(triton_pid)  # tritonserver and the model's stub

        process.send_signal(signal.SIGTERM)  # boto3's connection is open, idle in its pool
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        # No keep-alive connection held the stop up: the front closed the idle one at once rather
        # than waiting out its grace for answers in progress (uvicorn says when that ran out).
        assert "graceful shutdown exceeded" not in output, output
        assert wait_for(lambda: group_members(triton_pid) == [], timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    access = [line for line in output.splitlines() if "/endpoints/sd-studio/invocations" in line]
    assert len(access) == 2, output
    assert "model=sd_base.tar.gz status=200" in access[0] and access[0].endswith(" ms")
    assert "model=nothing.tar.gz status=400" in access[1]
    assert "GET /models model=- status=200" in output
    assert PROMPT not in output and SECRET not in output and KEY_ID not in output
    assert "built " in output and "stopped (tritonserver exit code 0)" in output


def test_a_taken_port_is_reported_at_once(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = run_endpoint(tmp_path, port, "--no-build")
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in output
    assert "tritonserver" not in output  # nothing was started


def test_a_missing_store_folder_answers_validation_errors(tmp_path):
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    process = run_endpoint(tmp_path, port, "--no-build")
    try:
        assert wait_for(lambda: pings(url) or process.poll() is not None, timeout=120)
        runtime = boto3.session.Session(region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y") \
            .client("sagemaker-runtime", endpoint_url=url, config=botocore.config.Config(retries={"total_max_attempts": 1}))
        with pytest.raises(runtime.exceptions.ValidationError, match="Failed to download model data"):
            runtime.invoke_endpoint(EndpointName="sd-studio", TargetModel="sd_base.tar.gz", Body=kserve_body())
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0



def test_an_endpoint_killed_during_a_call_leaves_no_triton_behind(model_repository, tmp_path):
    """kill -9 of the endpoint (which cannot clean up) while a model computes: its tritonserver and
    the model's process still end, since the kernel tells tritonserver its parent is gone."""
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    process = run_endpoint(tmp_path, port, "--build-from", str(model_repository))
    try:
        assert wait_for(lambda: pings(url) or process.poll() is not None, timeout=180)
        runtime = boto3.session.Session(
            region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
        ).client("sagemaker-runtime", endpoint_url=url,
                 config=botocore.config.Config(read_timeout=300, retries={"total_max_attempts": 1}))
        runtime.invoke_endpoint(EndpointName="sd-studio", TargetModel="sd_base.tar.gz",
                                ContentType="application/json", Body=kserve_body(PROMPT))
        triton_pid = requests.get(url + "/models", timeout=5).json()["triton"]["pid"]
        stubs = [pid for pid in group_members(triton_pid) if pid != triton_pid]
        assert len(stubs) == 1, stubs  # beside tritonserver, the model's stub
        idle = cpu_seconds(stubs[0])
        long_call = kserve_body(PROMPT, num_inference_steps=150, width=128, height=128)
        sender = subprocess.Popen(  # a call in flight when the endpoint dies
            [sys.executable, "-c", "import sys, requests; requests.post(sys.argv[1], data=sys.stdin.buffer.read(), "
             "headers={'X-Amzn-SageMaker-Target-Model': 'sd_base.tar.gz', 'Content-Type': 'application/json'}, "
             "timeout=60)", f"{url}/endpoints/sd-studio/invocations"],
            stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        sender.stdin.write(long_call)
        sender.stdin.close()
        wait_until_computing(stubs[0], since=idle)  # the endpoint dies while the model computes the call
        process.kill()
        process.wait(timeout=30)
        assert wait_for(lambda: group_members(triton_pid) == [], timeout=60), group_members(triton_pid)
        sender.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
