"""The endpoint the studio talks to: a SageMaker endpoint, a local one at a URL, or the checkout's
own local endpoint (`python -m deploy.local_endpoint`), started for the studio and stopped with it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sdserve.catalog import MODELS
from sdserve.checkpoint import TINY_KIND, checkpoint_dir, read_marker

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "serving" / "models"
LOCAL_ENDPOINT_MODULE = "deploy.local_endpoint"


class EndpointStartError(RuntimeError):
    pass


def local_endpoint_available() -> bool:
    """Whether this is a checkout with the local endpoint (the studio's Docker image has none)."""
    try:
        return importlib.util.find_spec(LOCAL_ENDPOINT_MODULE) is not None
    except ModuleNotFoundError:
        return False


def checkout_has_tiny_weights(models: Path = MODEL_REPOSITORY) -> bool:
    """Whether any model in the checkout holds the tiny random demo weights.

    Only called in a checkout, beside the local endpoint it starts.
    """
    for model in MODELS:
        try:
            if read_marker(checkpoint_dir(models, model)).get("kind") == TINY_KIND:
                return True
        except (OSError, ValueError):
            continue
    return False


class LocalEndpointProcess:
    """`python -m deploy.local_endpoint` on a free port, for as long as the `with` block runs.

    Only in a checkout (see local_endpoint_available), where the serving tools are importable.
    """

    def __init__(self, port: int | None = None, *, startup_timeout_s: float = 600):
        from serving.local_triton import find_free_port

        self.port = port or find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalEndpointProcess:
        from serving.local_triton import exit_with_parent

        self.process = subprocess.Popen(
            [sys.executable, "-m", LOCAL_ENDPOINT_MODULE, "--port", str(self.port)],
            cwd=REPO_ROOT,
            # Killed without cleaning up (SIGKILL), the studio still takes the endpoint (and its
            # Triton) with it.
            preexec_fn=exit_with_parent,
        )
        try:
            self._wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EndpointStartError(f"the local endpoint exited with status {self.process.returncode} while starting")
            if _pings(f"{self.url}/ping"):
                return
            time.sleep(0.5)
        raise EndpointStartError(f"the local endpoint did not answer {self.url}/ping within {self.startup_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # it stops its Triton server on SIGTERM
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _pings(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
