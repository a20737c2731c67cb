"""How `python -m studio` picks its endpoint, and the real local endpoint it starts and stops itself."""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.request

import pytest

from studio import __main__ as cli
from studio import endpoint_options
from studio.endpoint_launcher import (
    EndpointStartError,
    LocalEndpointProcess,
    checkout_random_weights,
)

from .endpoint_support import wait_for


@pytest.mark.triton
def test_the_local_endpoint_is_started_and_stopped():
    with LocalEndpointProcess(startup_timeout_s=120) as endpoint:
        with urllib.request.urlopen(f"{endpoint.url}/ping", timeout=5) as response:
            assert response.status == 200
        process = endpoint.process
    assert process.poll() is not None


@pytest.mark.triton
def test_an_endpoint_that_exits_unasked_is_started_again_on_its_port():
    with LocalEndpointProcess(startup_timeout_s=120) as endpoint:
        killed = endpoint.process
        killed.kill()
        assert wait_for(lambda: endpoint.restarts == 1, timeout=180), "not started again"
        with urllib.request.urlopen(f"{endpoint.url}/ping", timeout=5) as response:
            assert response.status == 200
        assert endpoint.process.pid != killed.pid
        again = endpoint.process
    assert again.poll() is not None  # and stopped for good with the studio


@pytest.mark.triton
def test_an_endpoint_that_dies_while_starting_is_reported():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(EndpointStartError, match="exited with status"):
            with LocalEndpointProcess(port=taken.getsockname()[1], startup_timeout_s=120):
                pass


def test_random_weights_are_recognized_by_their_marker(tmp_path):
    assert checkout_random_weights(tmp_path) is None
    for model, kind, found in (("sd_base", "hub", None), ("sd_inpaint", "full-size-random", "full-size-random"),
                               ("sd_depth", "tiny-random", "tiny-random")):  # tiny first: the demo's
        checkpoint = tmp_path / model / "1" / "checkpoint"
        checkpoint.mkdir(parents=True)
        (checkpoint / "weights.json").write_text(json.dumps({"kind": kind}))
        assert checkout_random_weights(tmp_path) == found


@pytest.fixture
def no_endpoint_env(monkeypatch):
    for name in ("STUDIO_ENDPOINT_URL", "STUDIO_ENDPOINT_NAME", "AWS_REGION", "AWS_DEFAULT_REGION", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_serve_on_localhost_7860(no_endpoint_env, monkeypatch):
    monkeypatch.setattr(endpoint_options, "own_endpoint_available", lambda: True)
    args = cli.parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert args.endpoint_url is None and args.endpoint_name is None


def test_a_sagemaker_endpoint_is_one_setting(no_endpoint_env):
    no_endpoint_env.setenv("STUDIO_ENDPOINT_NAME", "sd-studio")
    no_endpoint_env.setenv("AWS_REGION", "eu-west-1")
    args = cli.parse_args([])
    assert (args.endpoint_name, args.region) == ("sd-studio", "eu-west-1")
    assert cli.parse_args(["--endpoint-name", "other", "--region", "us-west-2"]).region == "us-west-2"
    # The studio knows nothing of a SageMaker endpoint's weights: no demo-weights banner, no 128 px start.
    with contextlib.ExitStack() as stack:
        endpoint = endpoint_options.open_endpoint(args, stack)
    assert endpoint.random_weights is None and endpoint.listing_url is None
    assert "sd-studio" in endpoint.where


def test_url_and_name_together_are_refused(no_endpoint_env, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--endpoint-url", "http://127.0.0.1:8080", "--endpoint-name", "x"])
    assert "not both" in capsys.readouterr().err


def test_the_history_key_survives_a_restart(tmp_path):
    first = cli._history_secret(tmp_path)
    assert first and cli._history_secret(tmp_path) == first



def test_the_history_key_lives_outside_the_served_results_folder(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / ".history-secret").write_text("kept-by-an-older-version")
    key = cli._history_secret(results)
    assert key == "kept-by-an-older-version"  # moved, so the browsers' histories still open
    assert not any(path.name.endswith("secret") for path in results.rglob("*"))
    [secret_file] = [path for path in tmp_path.iterdir() if path.name.endswith("history-secret")]
    assert secret_file.stat().st_mode & 0o077 == 0  # readable by its owner only
