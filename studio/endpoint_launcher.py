"""The endpoint the studio talks to: a SageMaker endpoint, a local one at a URL, or the checkout's
own local endpoint (`python -m serving.local_endpoint`), started for the studio and stopped with it.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from sdserve.catalog import MODELS
from sdserve.checkpoint import RANDOM_KINDS, checkpoint_dir, read_marker

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "serving" / "models"
LOCAL_ENDPOINT_MODULE = "serving.local_endpoint"

log = logging.getLogger(__name__)


class EndpointStartError(RuntimeError):
    pass


def own_endpoint_available() -> bool:
    """Whether this is a checkout with the local endpoint (the studio's Docker image has none)."""
    try:
        return importlib.util.find_spec(LOCAL_ENDPOINT_MODULE) is not None
    except ModuleNotFoundError:
        return False


def checkout_random_weights(models: Path = MODEL_REPOSITORY) -> str | None:
    """The kind of random weights a model of the checkout holds (RANDOM_KINDS, in that order:
    the tiny demo weights, then the full-size ones), or None when every model has real weights.

    Only called in a checkout, beside the local endpoint it starts.
    """
    kinds = set()
    for model in MODELS:
        try:
            kinds.add(read_marker(checkpoint_dir(models, model)).get("kind"))
        except (OSError, ValueError):
            continue
    return next((kind for kind in RANDOM_KINDS if kind in kinds), None)


class LocalEndpointProcess:
    """`python -m serving.local_endpoint` on a free port, for as long as the `with` block runs, and
    started again on the same port whenever it exits without being asked to (killed, crashed, or
    stopped from outside): the studio's URL for it never changes.

    Only in a checkout (see own_endpoint_available), where the serving tools are importable.
    `endpoint_args` are more of its command-line options (its model store, cache, limits).
    """

    def __init__(self, port: int | None = None, *, endpoint_args: Sequence[str] = (), startup_timeout_s: float = 600,
                 restart_pause_s: float = 1.0):
        from serving.processes import find_free_port

        self.port = port or find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", LOCAL_ENDPOINT_MODULE, "--port", str(self.port), *endpoint_args]
        self.startup_timeout_s = startup_timeout_s
        self.restart_pause_s = restart_pause_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._lock = threading.Lock()  # launching vs stopping
        self._stopping = threading.Event()

    def __enter__(self) -> LocalEndpointProcess:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        # Restarts are launched from this thread, which lives as long as the studio: the kernel's
        # "exit with your parent" signal (exit_with_parent) follows the thread that started a child.
        threading.Thread(target=self._supervise, name="local endpoint supervisor", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _start(self) -> None:
        from serving.processes import exit_with_parent

        with self._lock:
            if self._stopping.is_set():
                raise EndpointStartError("the studio is stopping")
            self.process = subprocess.Popen(
                self.command, cwd=REPO_ROOT,
                # Killed without cleaning up (SIGKILL), the studio still takes the endpoint (and its
                # Triton) with it.
                preexec_fn=exit_with_parent,
            )
        self._wait_until_up(self.process)

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            code = self.process.poll()
            if code is None or self._stopping.is_set():
                continue
            log.error("the local endpoint exited with status %s; starting it again at %s", code, self.url)
            self._stopping.wait(self.restart_pause_s)  # its port and Triton are being let go
            try:
                self._start()
            except EndpointStartError as error:
                log.error("starting the local endpoint again failed: %s; trying again", error)
                self._terminate()
                continue
            self.restarts += 1
            log.info("the local endpoint is back at %s (restart %d)", self.url, self.restarts)

    def _wait_until_up(self, process: subprocess.Popen) -> None:
        from serving.processes import ServerStartError, wait_until_answers

        try:
            wait_until_answers(f"{self.url}/ping", process, timeout_s=self.startup_timeout_s,
                               what="the local endpoint", stopping=self._stopping)
        except ServerStartError as error:
            raise EndpointStartError(str(error)) from None

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()  # no restart from here on
        self._terminate()

    def _terminate(self) -> None:
        from serving.processes import stop_process

        if self.process is not None:
            stop_process(self.process)  # it stops its Triton server on SIGTERM
