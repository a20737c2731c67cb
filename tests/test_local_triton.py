"""The local Triton launcher against the real tritonserver from the nvidia-pytriton wheel.

The test model ``echo`` upper-cases a BYTES input. Its ``config.pbtxt`` asks for KIND_GPU and its
``configs/cpu.pbtxt`` for KIND_CPU: on a machine without a GPU it only loads when the launcher
selects the cpu config (``--model-config-name=cpu``), which the tests below prove, in both modes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from serving.local_triton import SHM_DIR, SHM_PREFIX, LocalTriton, remove_orphaned_shm_regions
from serving.processes import group_members, port_is_free
from serving.triton_install import SERVING_DIR, TritonLaunchError, gpu_available

pytestmark = pytest.mark.triton

# On SIGTERM, Triton 2.51 waits (up to --exit-timeout-secs, 30 s) for every open HTTP
# connection to close, idle keep-alive ones included, and then exits with code 1. requests
# keeps its connection open after a plain requests.get(), so these tests ask for
# "Connection: close" and stop() stays fast; tritonclient's client.close() does the same.
web = requests.Session()
web.headers["Connection"] = "close"

no_gpu_only = pytest.mark.skipif(gpu_available(), reason="a KIND_GPU config loads on a GPU")

CONFIG = """\
backend: "python"
max_batch_size: 0
input [ {{ name: "text" data_type: TYPE_STRING dims: [ -1, 1 ] }} ]
output [
  {{ name: "upper" data_type: TYPE_STRING dims: [ -1, 1 ] }},
  {{ name: "info" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: {kind} }} ]
"""

MODEL_PY = """\
import json
import sys

import numpy as np
import sdserve  # from the checkout: the launcher puts serving/ on the stub's sys.path
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.kind = json.loads(args["model_config"])["instance_group"][0]["kind"]

    def execute(self, requests):
        info = json.dumps({"kind": self.kind, "sdserve": sdserve.__file__,
                           "prefix": sys.prefix, "numpy": np.__version__})
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            upper = np.vectorize(lambda b: b.decode("utf-8").upper().encode("utf-8"),
                                 otypes=[object])(text)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("upper", upper),
                pb_utils.Tensor("info", np.array([info.encode()], dtype=object)),
            ]))
        return responses
"""


def write_echo_model(parent: Path, name: str = "echo", model_py: str = MODEL_PY) -> Path:
    """``parent/name/`` with a KIND_GPU config.pbtxt, a KIND_CPU configs/cpu.pbtxt, 1/model.py."""
    model = parent / name
    (model / "1").mkdir(parents=True)
    (model / "configs").mkdir()
    (model / "config.pbtxt").write_text(CONFIG.format(kind="KIND_GPU"))
    (model / "configs" / "cpu.pbtxt").write_text(CONFIG.format(kind="KIND_CPU"))
    (model / "1" / "model.py").write_text(model_py)
    return parent


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def listen_addresses(port: int) -> set[str]:
    """Hex IPv4 and IPv6 addresses (as /proc/net/tcp and tcp6 write them) listening on a port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def infer_json(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(texts), 1], "datatype": "BYTES",
                        "data": texts}]}


# ---------------------------------------------------------------------------------------------
# Model-repository mode
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory) -> Path:
    return write_echo_model(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def repo_server(echo_repo, tmp_path_factory):
    triton = LocalTriton(echo_repo, log_path=tmp_path_factory.mktemp("logs") / "triton.log")
    with triton:
        yield triton


def test_infers_bytes_with_the_cpu_config(repo_server):
    import tritonclient.http as httpclient

    assert repo_server.model_config_name == ("cpu" if not gpu_available() else None)
    client = httpclient.InferenceServerClient(repo_server.http_address)
    assert client.is_server_ready() and client.is_model_ready("echo")

    text = httpclient.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([["hello"], ["grüße"]], dtype=object))
    result = client.infer("echo", [text])
    assert result.as_numpy("upper").tolist() == [[b"HELLO"], ["GRÜSSE".encode()]]

    info = json.loads(result.as_numpy("info")[0])
    if not gpu_available():
        assert info["kind"] == "KIND_CPU"
        assert client.get_model_config("echo")["instance_group"][0]["kind"] == "KIND_CPU"
    client.close()
    # The stub ran this environment's Python with the checkout's serving/ on PYTHONPATH.
    assert Path(info["sdserve"]).resolve().is_relative_to(SERVING_DIR / "sdserve")
    assert Path(info["prefix"]).resolve() == Path(sys.prefix).resolve()
    assert info["numpy"].startswith("1.")


def test_urls_and_bind_address(repo_server):
    assert repo_server.is_running() and repo_server.pid
    assert repo_server.http_url == f"http://127.0.0.1:{repo_server.ports['http']}"
    assert web.get(repo_server.http_url + "/v2/health/ready", timeout=5).status_code == 200
    assert "nv_inference" in web.get(repo_server.metrics_url, timeout=5).text
    assert len({repo_server.ports[p] for p in ("http", "grpc", "metrics")}) == 3
    # HTTP and metrics listen on loopback only.
    for protocol in ("http", "metrics"):
        assert listen_addresses(repo_server.ports[protocol]) == {"0100007F"}, protocol
    with pytest.raises(RuntimeError):
        repo_server.sagemaker_url  # noqa: B018 - not served in this mode


def test_a_taken_port_is_refused_before_starting(repo_server, echo_repo, tmp_path):
    taken = repo_server.ports["http"]
    second = LocalTriton(echo_repo, http_port=taken, log_path=tmp_path / "second.log")
    with pytest.raises(TritonLaunchError, match=rf"\b{taken}\b"):
        second.start()
    assert second.pid is None and not second.is_running()
    assert not (tmp_path / "second.log").exists()  # nothing was started


def test_stop_ends_server_and_stubs_and_frees_the_port(echo_repo, tmp_path):
    triton = LocalTriton(echo_repo, log_path=tmp_path / "triton.log").start(timeout=120)
    try:
        port = triton.ports["http"]
        response = web.post(f"{triton.http_url}/v2/models/echo/infer",
                                 json=infer_json(["x"]), timeout=30)
        assert response.status_code == 200, response.text
        members = group_members(triton.pid)
        assert triton.pid in members and len(members) >= 2, "expected the server and its stub"
        assert triton.startup_seconds < 60
        regions = list(SHM_DIR.glob(f"{triton.shm_prefix}*"))
        assert regions, "the stub's shared memory is named with the server's prefix"
    finally:
        code = triton.stop()
    assert code == 0
    assert not triton.is_running()
    assert not any(alive(pid) for pid in members)
    assert group_members(members[0]) == []
    assert port_is_free(port)
    assert not any(region.exists() for region in regions)
    assert "successfully unloaded 'echo'" in "\n".join(triton.log_tail(200))
    assert triton.stop() == 0  # stopping twice is harmless


@no_gpu_only
def test_gpu_config_without_config_name_fails_with_log_lines(echo_repo, tmp_path):
    # The premise of the cpu-config checks: config.pbtxt alone cannot load without a GPU.
    triton = LocalTriton(echo_repo, model_config_name=None, log_path=tmp_path / "t.log")
    with pytest.raises(TritonLaunchError) as caught:
        triton.start(timeout=60)
    message = str(caught.value)
    assert "exited with code" in message and "last lines of" in message
    assert "KIND_GPU but no GPUs are available" in message
    assert not triton.is_running() and group_members(triton.pid) == []


def test_broken_model_gives_log_lines(tmp_path):
    repo = write_echo_model(tmp_path / "repo", model_py="def broken(:\n")
    triton = LocalTriton(repo, log_path=tmp_path / "t.log")
    with pytest.raises(TritonLaunchError) as caught:
        triton.start(timeout=60)
    message = str(caught.value)
    assert "failed to load 'echo'" in message
    assert "SyntaxError" in message or "invalid syntax" in message
    assert len(message.splitlines()) > 10
    assert group_members(triton.pid) == []


def test_missing_repository(tmp_path):
    with pytest.raises(TritonLaunchError, match="not a folder"):
        LocalTriton(tmp_path / "nowhere", log_path=tmp_path / "t.log").start()


def test_not_ready_in_time_is_reported(tmp_path):
    # A model whose initialize() blocks keeps the server from becoming ready.
    initialize = "    def initialize(self, args):\n"
    slow = MODEL_PY.replace(initialize, initialize + "        __import__('time').sleep(60)\n")
    repo = write_echo_model(tmp_path / "repo", model_py=slow)
    triton = LocalTriton(repo, log_path=tmp_path / "t.log")
    started = time.monotonic()
    with pytest.raises(TritonLaunchError, match="not ready .* within 3 s"):
        triton.start(timeout=3)
    assert time.monotonic() - started >= 3, "gave up before its timeout"
    assert not triton.is_running() and group_members(triton.pid) == []


# ---------------------------------------------------------------------------------------------
# SageMaker multi-model mode
# ---------------------------------------------------------------------------------------------
#
# How this Triton (2.51) names a model loaded with POST /models, found by experiment:
# * Without the X-Amzn-SageMaker-Target-Model header, the body's "model_name" becomes the Triton
#   model name (the model folder inside "url" is mapped to it, whatever the folder is called);
#   invoke with POST /models/<model_name>/invoke, unload with DELETE /models/<model_name>, and
#   GET /models lists {"modelName": <model_name>, "modelUrl": <url>}.
# * With the header (what SageMaker's front end sends, e.g. "echo.tar.gz"), the header value
#   verbatim becomes the Triton model name and the body's "model_name" is only bookkeeping:
#   invoke and unload must send the same header (the path's name is then not used for the
#   lookup), responses carry "model_name": "echo.tar.gz", GET /models/<body name> answers, but
#   GET /models lists an empty object {} for such a model. A DELETE without the header for a
#   header-loaded model tries to unload a model that does not exist and hangs for Triton's full
#   350 s unload wait before answering 200, so always send the header consistently.
# * Loading the same url twice answers 409 ("has already been registered").


@pytest.fixture(scope="module")
def sm_server(tmp_path_factory):
    triton = LocalTriton(sagemaker=True,
                         log_path=tmp_path_factory.mktemp("sm-logs") / "triton.log")
    with triton:
        yield triton


def test_sagemaker_ping_and_only_the_sagemaker_port(sm_server):
    assert web.get(sm_server.sagemaker_url + "/ping", timeout=5).status_code == 200
    assert sm_server.ports["http"] is None and sm_server.ports["grpc"] is None
    assert sm_server.ports["metrics"] is None
    assert web.get(sm_server.sagemaker_url + "/models", timeout=5).json() == {"models": []}
    # Triton binds this listener to 0.0.0.0; the preloaded loopback_bind keeps it on 127.0.0.1.
    assert listen_addresses(sm_server.ports["sagemaker"]) == {"0100007F"}


def test_sagemaker_load_invoke_list_unload_by_body_name(sm_server, tmp_path):
    url = str(write_echo_model(tmp_path / "extracted", name="whatever_folder"))
    base = sm_server.sagemaker_url

    response = web.post(f"{base}/models", json={"model_name": "echo", "url": url},
                             timeout=120)
    assert response.status_code == 200, response.text + "\n".join(sm_server.log_tail())
    try:
        assert web.get(f"{base}/models", timeout=5).json() == {
            "models": [{"modelName": "echo", "modelUrl": url}]}
        assert web.get(f"{base}/models/echo", timeout=5).status_code == 200

        response = web.post(f"{base}/models/echo/invoke", json=infer_json(["hi", "yo"]),
                                 timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == "echo"
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["upper"]["data"] == ["HI", "YO"]
        if not gpu_available():  # loaded through POST /models, still the cpu config
            assert json.loads(outputs["info"]["data"][0])["kind"] == "KIND_CPU"

        again = web.post(f"{base}/models", json={"model_name": "echo", "url": url},
                              timeout=60)
        assert again.status_code == 409
    finally:
        assert web.delete(f"{base}/models/echo", timeout=60).status_code == 200
    assert web.get(f"{base}/models", timeout=5).json() == {"models": []}
    assert web.post(f"{base}/models/echo/invoke", json=infer_json(["hi"]),
                         timeout=30).status_code == 404


def test_sagemaker_target_model_header_names_the_model(sm_server, tmp_path):
    url = str(write_echo_model(tmp_path / "extracted"))
    base = sm_server.sagemaker_url
    header = {"X-Amzn-SageMaker-Target-Model": "echo.tar.gz"}
    body_name = "3f2a9c0d"  # SageMaker sends a hash here

    response = web.post(f"{base}/models", json={"model_name": body_name, "url": url},
                             headers=header, timeout=120)
    assert response.status_code == 200, response.text + "\n".join(sm_server.log_tail())
    try:
        response = web.post(f"{base}/models/{body_name}/invoke", json=infer_json(["hi"]),
                                 headers=header, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model_name"] == "echo.tar.gz"  # the Triton model name
        assert response.json()["outputs"][0]["data"] == ["HI"]
        # Without the header the body name is not a Triton model.
        assert web.post(f"{base}/models/{body_name}/invoke", json=infer_json(["hi"]),
                             timeout=30).status_code != 200
        assert web.get(f"{base}/models/{body_name}", timeout=5).json()["modelUrl"] == url
    finally:
        response = web.delete(f"{base}/models/{body_name}", headers=header, timeout=60)
        assert response.status_code == 200
    assert web.post(f"{base}/models/{body_name}/invoke", json=infer_json(["hi"]),
                         headers=header, timeout=30).status_code == 404
    assert web.get(f"{base}/models", timeout=5).json() == {"models": []}


@no_gpu_only
def test_sagemaker_without_config_name_cannot_load_the_gpu_config(tmp_path):
    url = str(write_echo_model(tmp_path / "extracted"))
    with LocalTriton(sagemaker=True, model_config_name=None,
                     log_path=tmp_path / "t.log") as triton:
        response = web.post(f"{triton.sagemaker_url}/models",
                                 json={"model_name": "echo", "url": url}, timeout=120)
    assert response.status_code == 400
    assert "KIND_GPU but no GPUs are available" in response.text


def test_command_line_help():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "serving.local_triton", "--help"],
                            cwd=SERVING_DIR.parent, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--model-repository" in result.stdout


def test_missing_binary_is_explained(monkeypatch):
    import importlib.util

    from serving import triton_install

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TritonLaunchError, match="pip install nvidia-pytriton"):
        triton_install.find_triton()


def test_prepare_is_idempotent_and_replaces_a_stale_stub(tmp_path):
    from serving.triton_install import TritonInstallation, prepare_triton

    root = tmp_path / "tritonserver"
    install = TritonInstallation(root=root, libs=tmp_path / "libs")
    install.binary.parent.mkdir(parents=True)
    install.binary.write_bytes(b"server")
    install.bundled_stub().parent.mkdir(parents=True)
    install.bundled_stub().write_bytes(b"stub for this python")
    install.python_backend.mkdir(parents=True)

    for _ in range(2):
        assert prepare_triton(install) is install
        assert install.stub.read_bytes() == b"stub for this python"
        assert os.access(install.stub, os.X_OK) and os.access(install.binary, os.X_OK)
    install.stub.write_bytes(b"stub of another python")  # e.g. left by another interpreter
    prepare_triton(install)
    assert install.stub.read_bytes() == b"stub for this python"
    assert sorted(p.name for p in install.python_backend.iterdir()) == [install.stub.name]


def test_sigterm_on_the_command_line_stops_cleanly(echo_repo, tmp_path):
    import signal
    import subprocess

    log = tmp_path / "cli.log"
    cli = subprocess.Popen(
        [sys.executable, "-m", "serving.local_triton", "--model-repository", str(echo_repo),
         "--log-file", str(log)], cwd=SERVING_DIR.parent, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in cli.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        url = next(line.split()[-1] for line in lines if "HTTP (KServe v2)" in line)
        assert web.get(url + "/v2/health/ready", timeout=5).status_code == 200
        ready = next(line for line in lines if line.startswith("ready"))  # "... pid N, ..."
        server_pid = int(ready.split("pid ")[1].split(",")[0])
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    assert not alive(server_pid) and group_members(server_pid) == []


def test_a_killed_servers_shared_memory_is_removed_by_stop(echo_repo, tmp_path):
    triton = LocalTriton(echo_repo, log_path=tmp_path / "triton.log").start(timeout=120)
    try:
        web.post(f"{triton.http_url}/v2/models/echo/infer", json=infer_json(["x"]), timeout=30)
        regions = list(SHM_DIR.glob(f"{triton.shm_prefix}*"))
        assert regions
        os.kill(triton.pid, signal.SIGKILL)  # it unlinks nothing now
        triton._process.wait(30)
        assert all(region.exists() for region in regions)
    finally:
        triton.stop()
    assert not any(region.exists() for region in regions)


def test_regions_of_servers_whose_owner_is_gone_are_removed_at_the_next_start(tmp_path):
    # Names as a server of a killed process left them (a pid above pid_max never lives), one of a
    # live process (this one), and one that is not this project's.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    orphan = SHM_DIR / f"{SHM_PREFIX}{pid_max + 1}-0000aaaa-triton_python_backend_shm_region_x"
    living = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-0000bbbb-triton_python_backend_shm_region_y"
    other = SHM_DIR / f"someone-else-{pid_max + 1}-z"
    for region in (orphan, living, other):
        region.write_bytes(b"\0" * 16)
    try:
        assert remove_orphaned_shm_regions() >= 1
        assert not orphan.exists() and living.exists() and other.exists()
    finally:
        for region in (orphan, living, other):
            region.unlink(missing_ok=True)

