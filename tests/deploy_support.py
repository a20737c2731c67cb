"""Fixtures and constants of the deploy tests: a clean AWS environment, moto in server mode on
127.0.0.1, a tripwire that proves no request was sent, and fake model folders. The fixtures are
made available to every test by conftest.py; the tests import only the constants and helpers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from moto.core.responses import ActionResult
from moto.sagemaker.responses import SageMakerResponse
from moto.server import ThreadedMotoServer
from sdserve.catalog import MODELS

from deploy.cli import main
from tests.test_archive import make_model

ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/sd-studio-sagemaker"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-studio-triton@sha256:{'1' * 64}"  # by digest, as up wants
BUCKET = "sd-studio-test-bucket"


def _moto_update_endpoint(self: SageMakerResponse) -> ActionResult:
    """UpdateEndpoint, which moto 5.2.5 lacks, as SageMaker does it: the endpoint switches to the new
    config (moto's endpoints are InService at once)."""
    backend = self.sagemaker_backend
    endpoint = backend.endpoints[self._get_param("EndpointName")]
    config = backend.describe_endpoint_config(self._get_param("EndpointConfigName"))
    endpoint.endpoint_config_name = config["EndpointConfigName"]
    endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
    return ActionResult({"EndpointArn": endpoint.arn})


@pytest.fixture(scope="session")
def moto_url() -> str:
    SageMakerResponse.update_endpoint = _moto_update_endpoint
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials, no profile, no SD_DEPLOY_* leaking in, and a working directory without a deploy.toml."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "SD_DEPLOY_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def moto(moto_url: str, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> str:
    """A reset moto server that every deploy client talks to (through the tool's own setting)."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).close()
    monkeypatch.setenv("SD_DEPLOY_AWS_ENDPOINT_URL", moto_url)
    return moto_url


def aws_client(moto_url: str, service: str):
    return boto3.client(service, region_name=REGION, endpoint_url=moto_url)


class Tripwire:
    """A TCP listener that counts connections and answers each with HTTP 403 (not retried by boto3)."""

    def __init__(self) -> None:
        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def tripwire(clean_env: None) -> Tripwire:
    wire = Tripwire()
    yield wire
    wire.close()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A model repository with the four catalog models and small fake checkpoints."""
    for name in MODELS:
        make_model(tmp_path / "models", name, weights=f"{name} weights".encode())
    return tmp_path / "models"


@pytest.fixture
def deploy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[..., tuple[int, str, str]]:
    """Run `python -m deploy ARGS` in-process: (exit code, stdout, stderr). Builds go to tmp_path."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        argv = list(args) if "--help" in args else [*args, "--build-dir", str(tmp_path / "build")]
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return run
