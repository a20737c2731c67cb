"""Helpers of the local endpoint tests: starting an endpoint, a real boto3 sagemaker-runtime
client, request bodies and hostile archives (the archive store is a fixture in conftest.py)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import boto3
import botocore.config
import requests
from PIL import Image, ImageDraw

from serving.archive import archive_name
from serving.local_endpoint import EndpointSettings, LocalEndpoint

ENDPOINT_NAME = "sd-studio"
SIZE = 64
STEPS = 2


def start_endpoint(store: str | Path, tmp: Path, artifacts: Path, log_name: str, **settings) -> LocalEndpoint:
    endpoint = LocalEndpoint(EndpointSettings(
        port=0, model_store=str(store), cache_dir=tmp / "cache",
        log_dir=artifacts / log_name, **{"load_wait_s": 180.0, **settings}))
    return endpoint.start()


def runtime_client(url: str, *, read_timeout: float = 300):
    """An unmodified boto3 sagemaker-runtime client pointed at the local endpoint, no retries."""
    return boto3.session.Session(
        region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local"
    ).client("sagemaker-runtime", endpoint_url=url, config=botocore.config.Config(
        read_timeout=read_timeout, retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=16))


def kserve_body(prompt: str = "a lighthouse", **gen_args) -> bytes:
    values = {"prompt": prompt, "gen_args": json.dumps({"num_inference_steps": STEPS, "height": SIZE,
                                                         "width": SIZE, "seed": 1, **gen_args})}
    return json.dumps({"inputs": [{"name": n, "shape": [1, 1], "datatype": "BYTES", "data": [v]}
                                  for n, v in values.items()]}).encode()


def invoke(client, target: str, body: bytes | None = None, **extra):
    response = client.invoke_endpoint(EndpointName=ENDPOINT_NAME, TargetModel=target,
                                      ContentType="application/json", Accept="application/json",
                                      Body=body if body is not None else kserve_body(), **extra)
    return response, json.loads(response["Body"].read())


def answer_image(answer: dict) -> Image.Image:
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    return Image.open(io.BytesIO(base64.b64decode(outputs["generated_image"][0])))


def answer_parameters(answer: dict) -> dict:
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    return json.loads(outputs["parameters"][0])


def listing(endpoint: LocalEndpoint) -> dict:
    with requests.get(endpoint.url + "/models", timeout=10) as response:
        assert response.status_code == 200
        return response.json()


def model_info(endpoint: LocalEndpoint, target: str) -> dict:
    return {m["target_model"]: m for m in listing(endpoint)["models"]}.get(target, {})


def scene(size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (135, 180, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 3 // 5, size, size), fill=(120, 90, 60))
    draw.rectangle((size // 3, size // 3, size * 2 // 3, size * 2 // 3), fill=(200, 40, 40))
    return image


def mask(size: int = SIZE) -> Image.Image:
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill=255)
    return image


def copy_archive(store: Path, model: str, target: str) -> str:
    """The archive of ``model`` under another TargetModel (another model as far as the endpoint
    is concerned), e.g. to have a model no other test has loaded yet."""
    destination = store / target
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store / archive_name(model), destination)
    return target


class HeldCalls:
    """While a test runs, the in-process endpoint's calls wait on their way to Triton, in flight as
    the endpoint counts them, until `release` is set: a call exactly as long as the test needs,
    instead of a long call timed against the machine's speed (and the model's work budget, which
    refuses a call it predicts too long on a slow or busy machine). `arrived` is set by the first.
    `method="load"` holds the endpoint's model loads instead (each after its evictions)."""

    def __init__(self, endpoint: LocalEndpoint, monkeypatch, method: str = "invoke") -> None:
        self.arrived, self.release = threading.Event(), threading.Event()
        forward = getattr(endpoint.triton, method)

        def held(*args, **kwargs):
            self.arrived.set()
            if not self.release.wait(300):
                raise TimeoutError("a held call was never released")
            return forward(*args, **kwargs)

        monkeypatch.setattr(endpoint.triton, method, held)


# CPU time a model's process spends on a call before a test may take it as computing the call:
# far more than an idle stub spends, far less than a 150-step call at 128 px takes.
COMPUTING_CPU_S = 0.5


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system, all threads) process `pid` has used, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_until_computing(pid: int, since: float, timeout: float = 120.0) -> None:
    """Return once process `pid` (a model's stub) has used COMPUTING_CPU_S of CPU time more than
    `since` (its cpu_seconds before the call was sent): the call is being computed, not only in
    flight in the endpoint or in Triton's queue."""
    assert wait_for(lambda: cpu_seconds(pid) - since >= COMPUTING_CPU_S, timeout=timeout, interval=0.05), (
        f"process {pid} did not compute the call within {timeout:g} s "
        f"({cpu_seconds(pid) - since:.2f} s of CPU since it was sent)")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2):
    """Poll `predicate` until it is true or `timeout` has passed; its last value (the caller
    asserts it, a hang guard: the wait ends as soon as the state is reached)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- hostile and broken archives -------------------------------------------------------------

def _tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(buffer.getvalue()))
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, None


MODEL_FILES = [_file("evil/config.pbtxt", b'name: "evil"\nbackend: "python"\n'), _file("evil/1/model.py", b"")]


def evil_archive(path: Path, trick: str, outside: Path) -> Path:
    """An archive that tries to write ``outside`` (an absolute path out of the cache) by one trick."""
    relative_escape = "evil/" + "../" * 12 + str(outside).lstrip("/")
    members = {
        "absolute path": [_file(str(outside), b"pwned")],
        "dot-dot": [_file(relative_escape, b"pwned")],
        "symlink out": [_special("evil/1/checkpoint", tarfile.SYMTYPE, str(outside.parent)),
                        _file("evil/1/checkpoint/pwned", b"pwned")],
        "relative symlink out": [_special("evil/link", tarfile.SYMTYPE, "../" * 12 + str(outside).lstrip("/"))],
        "hard link out": [_special("evil/1/weights", tarfile.LNKTYPE, str(outside))],
        "character device": [_special("evil/1/null", tarfile.CHRTYPE)],
        "block device": [_special("evil/1/disk", tarfile.BLKTYPE)],
        "fifo": [_special("evil/1/pipe", tarfile.FIFOTYPE)],
    }[trick]
    return _tar_gz(path, MODEL_FILES + members)


EVIL_TRICKS = ["absolute path", "dot-dot", "symlink out", "relative symlink out", "hard link out",
               "character device", "block device", "fifo"]


def bomb_archive(path: Path, size: int) -> Path:
    """A small .tar.gz whose one file expands to ``size`` bytes of zeros (streamed, not in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tar:
        for info, data in MODEL_FILES:
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("evil/1/huge.bin")
        info.size = size
        tar.addfile(info, _Zeros(size))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n


def _python_model_archive(path: Path, name: str, initialize: str) -> Path:
    """A well-formed archive of a Python-backend model whose initialize() body is ``initialize``."""
    config = (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
              'input [ { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
              'output [ { name: "generated_image" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
              'instance_group [ { count: 1 kind: KIND_CPU } ]\n').encode()
    model = f"class TritonPythonModel:\n    def initialize(self, args):\n        {initialize}\n".encode()
    return _tar_gz(path, [_file(f"{name}/config.pbtxt", config), _file(f"{name}/1/model.py", model)])


def broken_model_archive(path: Path, name: str = "broken") -> Path:
    """A well-formed archive whose model fails in initialize() (quick: no torch import)."""
    return _python_model_archive(path, name, "raise RuntimeError('the weights are missing: no checkpoint folder')")


def slow_model_archive(path: Path, name: str = "slow", seconds: int = 120) -> Path:
    """A well-formed archive whose model takes ``seconds`` to load."""
    return _python_model_archive(path, name, f"__import__('time').sleep({seconds})")


def files_below(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def same_tree(before: set[str], folder: Path) -> bool:
    return files_below(folder) == before


def environment_without_aws(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
