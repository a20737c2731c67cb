"""The local endpoint: its settings, LocalEndpoint (the HTTP front, tritonserver and the model
registry together) and InvokeEndpoint's behaviour; the routes and HTTP handling are in front.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdserve.catalog import INVOCATION_SECONDS, MAX_PAYLOAD_BYTES

from serving.archive import REPO_ROOT

from .cache import ModelCache
from .errors import (
    LOCAL_ACCOUNT,
    EndpointError,
    InternalFailure,
    ServiceUnavailable,
    ValidationError,
    answer_too_large,
    model_error,
)
from .front import (  # noqa: F401 (MAX_REQUEST_BYTES: exported here)
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    REQUEST_TIMEOUT_S,
    HttpFront,
)
from .registry import Limits, ModelEntry, ModelRegistry
from .store import ModelStore, build_missing_archives, check_target, open_store
from .triton import TARGET_HEADER, TritonBackend, TritonUnreachable

log = logging.getLogger("serving.local_endpoint")

CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
CUSTOM_ATTRIBUTES_MAX = 1024
DEFAULT_STORE = REPO_ROOT / "build" / "model-store"
DEFAULT_CACHE = REPO_ROOT / "build" / "model-cache"
DEFAULT_LOG_DIR = REPO_ROOT / "build" / "local-endpoint"
DEFAULT_REPOSITORY = REPO_ROOT / "serving" / "models"
# The budget counts a model's extracted folder; what a loaded model holds in memory is more. On a
# CPU, measured by `make bench-full-size` (full-size random weights, fp16 files loaded as fp32,
# the stub's Python and torch beside them): each model's Triton stub held 2.23 (Generate) to 2.34
# (Upscale) times its folder. The default budget is the folders whose models fit in
# MODELS_MEMORY_SHARE of the machine's memory; the rest is tritonserver's, the front's, a studio's
# and the system's.
RESIDENT_PER_FOLDER_BYTE = 2.35
MODELS_MEMORY_SHARE = 0.7


def default_max_gb(memory_bytes: int | None = None) -> float:
    """GiB of extracted folders whose loaded models fit in this machine's memory (see above)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return round(memory_bytes * MODELS_MEMORY_SHARE / RESIDENT_PER_FOLDER_BYTE / 2**30, 1)


@dataclass
class EndpointSettings:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: a free port (see LocalEndpoint.url)
    endpoint_name: str = "sd-studio"
    model_store: str = str(DEFAULT_STORE)  # a folder, or s3://bucket/prefix
    s3_endpoint_url: str | None = None
    region: str | None = None
    cache_dir: Path = DEFAULT_CACHE
    build_from: Path | None = None  # archive this repository's models into a local store first
    max_models: int | None = 4
    max_gb: float | None = field(default_factory=default_max_gb)  # None or 0: no limit
    load_wait_s: float = 60.0
    load_timeout_s: float = 900.0
    invoke_timeout_s: float = float(INVOCATION_SECONDS)  # SageMaker's: 60 s for the model's answer
    max_answer_bytes: int = MAX_PAYLOAD_BYTES  # SageMaker's: an answer of 6 MB at most
    retry_failed_after_s: float = 300.0
    max_archive_gb: float = 30.0
    log_dir: Path = DEFAULT_LOG_DIR
    triton_startup_timeout_s: float = 300.0
    model_config_name: str | None = "auto"  # "cpu" without a GPU, config.pbtxt with one
    # CPU threads each model's pipeline computes with (OMP_NUM_THREADS of its Triton stub); None:
    # torch's default, every core. Fewer leave cores to what shares the machine (a studio, clients).
    compute_threads: int | None = None
    variant_name: str = "AllTraffic"
    request_timeout_s: float = REQUEST_TIMEOUT_S  # to receive a whole request; then 408 and closed
    max_connections: int = MAX_CONNECTIONS  # open at once; past it a request gets 503 and is closed
    extra: dict[str, Any] = field(default_factory=dict)

    def limits(self) -> Limits:
        return Limits(max_models=self.max_models or None,
                      max_bytes=int(self.max_gb * 2**30) if self.max_gb else None,
                      load_wait_s=self.load_wait_s, load_timeout_s=self.load_timeout_s,
                      retry_failed_after_s=self.retry_failed_after_s)


class LocalEndpoint:
    """The front, its tritonserver and the model registry; ``start()``/``stop()`` or ``with``."""

    def __init__(self, settings: EndpointSettings | None = None) -> None:
        self.settings = settings or EndpointSettings()
        self.triton = TritonBackend(log_path=Path(self.settings.log_dir) / "triton.log",
                                    model_config_name=self.settings.model_config_name,
                                    compute_threads=self.settings.compute_threads)
        self.store: ModelStore | None = None
        self.cache: ModelCache | None = None
        self.registry: ModelRegistry | None = None
        self.front: HttpFront | None = None
        self.requests_total = 0  # counted by the front
        self.invocations_total = 0
        self._counter_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.front is None:
            raise RuntimeError("not started")
        host, port = self.front.address
        return f"http://{host}:{port}"

    @property
    def log_hint(self) -> str:
        return f"the endpoint's Triton log {self.triton.log_path}"

    def listen(self) -> LocalEndpoint:
        """Serve the HTTP front alone: /ping says Starting and invocations get 503 until start()
        has the model server up. start() begins with it; tests of the front use it on its own."""
        if self.front is None:
            s = self.settings
            self.front = HttpFront(self, s.host, s.port, request_timeout_s=s.request_timeout_s,
                                   max_connections=s.max_connections).start()
        return self

    def start(self) -> LocalEndpoint:
        s = self.settings
        self.listen()  # first, so a taken port is reported before anything slow
        try:
            if s.build_from is not None:
                if str(s.model_store).startswith("s3://"):
                    raise ValueError("--build-from needs a local model store (upload to S3 with "
                                     "`python -m deploy package`)")
                build_missing_archives(Path(s.build_from), Path(s.model_store))
            self.store = open_store(s.model_store, s3_endpoint_url=s.s3_endpoint_url, region=s.region)
            self.cache = ModelCache(Path(s.cache_dir), max_archive_bytes=int(s.max_archive_gb * 2**30))
            self.triton.start(timeout=s.triton_startup_timeout_s)
            self.registry = ModelRegistry(
                self.store, self.cache, self.triton, s.limits(), log_hint=self.log_hint,
                log_stream_arn=f"arn:aws:logs:local:{LOCAL_ACCOUNT}:log-group:/aws/sagemaker/Endpoints/"
                               f"{s.endpoint_name}")
            self._thread(self._watch_triton, "triton watchdog")
        except BaseException:
            self.stop()
            raise
        log.info("endpoint %s ready at %s (model store %s, cache %s, at most %s models / %s)",
                 s.endpoint_name, self.url, self.store.url, self.cache.root, s.max_models or "any number of",
                 f"{s.max_gb} GB" if s.max_gb else "no size limit")
        return self

    def stop(self) -> int | None:
        """Stop serving, then stop tritonserver (its connections closed first); its exit code."""
        self._stopping.set()
        if self.front is not None:
            self.front.stop()
        return self.triton.stop()

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def ready(self) -> bool:
        return self.registry is not None and not self._stopping.is_set()

    def healthy(self) -> bool:
        """What GET /ping answers: ready, and tritonserver up (not being restarted)."""
        return self.ready and self.registry.triton_down is None and self.triton.is_running()

    # -- tritonserver death -------------------------------------------------------------------

    def _watch_triton(self) -> None:
        # Restarts happen on this thread, which lives as long as the endpoint: the kernel tells a
        # tritonserver to exit when the thread that started it ends (processes.exit_with_parent).
        while not self._stopping.wait(0.5):
            if not self.triton.is_running():
                self._triton_died()
                self._restart_triton()

    def _triton_died(self) -> str:
        """Record the death (once; the watchdog restarts tritonserver); the reason."""
        code = self.triton.exit_code()
        reason = f"tritonserver exited unexpectedly with code {code}"
        if self.registry is not None and self.registry.triton_died(reason) and not self._stopping.is_set():
            log.error("%s; restarting it (models are loaded again on their next call)", reason)
        return reason

    def _restart_triton(self) -> None:
        while not self._stopping.is_set():
            try:
                self.triton.restart(timeout=self.settings.triton_startup_timeout_s)
            except Exception as error:  # noqa: BLE001 - keep trying, say why
                log.error("restarting tritonserver failed: %s; trying again in 5 s", error)
                self._stopping.wait(5)
                continue
            if self.registry is not None:
                self.registry.triton_restarted()
            return

    # -- invoke ------------------------------------------------------------------------------

    def invoke(self, endpoint_name: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes, str]:
        """(status, headers, body, target) for one InvokeEndpoint call; raises EndpointError."""
        s = self.settings
        if endpoint_name != s.endpoint_name:
            raise ValidationError(f"Endpoint {endpoint_name} of account {LOCAL_ACCOUNT} not found.")
        target = check_target(headers.get(TARGET_HEADER.lower()))
        custom = headers.get(CUSTOM_ATTRIBUTES_HEADER.lower())
        if custom is not None and (len(custom) > CUSTOM_ATTRIBUTES_MAX
                                   or any(not 0x20 <= ord(c) <= 0x7E for c in custom)):
            raise ValidationError(f"CustomAttributes must be at most {CUSTOM_ATTRIBUTES_MAX} visible "
                                  f"US-ASCII characters.")
        registry = self.registry
        if registry is None:
            raise ServiceUnavailable("The local endpoint is still starting. Try your call again shortly.")
        forward = {"Content-Type": headers.get("content-type") or "application/json"}
        if headers.get("accept"):
            forward["Accept"] = headers["accept"]
        if custom is not None:
            forward[CUSTOM_ATTRIBUTES_HEADER] = custom
        with self._counter_lock:
            self.invocations_total += 1

        for round_ in (1, 2):
            entry = registry.acquire(target)
            generation, name = entry.generation, entry.triton_name
            try:
                answer = self.triton.invoke(name, body, forward, timeout=s.invoke_timeout_s)
            except TritonUnreachable as error:
                raise self._unreachable(entry, error) from None
            finally:
                registry.release(entry)
            if answer.status == 200 and len(answer.body) > s.max_answer_bytes:
                raise answer_too_large(target, len(answer.body), s.max_answer_bytes, log_hint=self.log_hint,
                                       log_stream_arn=registry.log_stream_arn)
            if answer.status == 200:
                out = {"Content-Type": answer.content_type or "application/json",
                       "x-Amzn-Invoked-Production-Variant": s.variant_name}
                attributes = answer.headers.get(CUSTOM_ATTRIBUTES_HEADER.lower(), custom)
                if attributes is not None:
                    out[CUSTOM_ATTRIBUTES_HEADER] = attributes
                return 200, out, answer.body, target
            if answer.stub_crashed():
                raise registry.crashed(entry, generation, answer.text)
            if _model_unknown_to_triton(answer) and round_ == 1:
                registry.gone(entry, generation)  # Triton lost it: load it again, once
                continue
            raise model_error(target, answer.status, answer.text, log_hint=self.log_hint,
                              log_stream_arn=registry.log_stream_arn)
        raise AssertionError("unreachable")

    def _unreachable(self, entry: ModelEntry, error: TritonUnreachable) -> EndpointError:
        if error.timed_out:
            # AWS's words for a container that does not answer in time.
            return model_error(entry.target, 0, json.dumps({"error": (
                f"Your invocation timed out while waiting for a response from model {entry.target} "
                f"(the {self.settings.invoke_timeout_s:.0f} s an invocation may take; --invoke-timeout). "
                "Review the latency metrics for each container in Amazon CloudWatch, resolve the issue, "
                "and try again.")}), log_hint=self.log_hint)
        time.sleep(0.2)  # let the process table catch up with a dying server
        if not self.triton.is_running() and not self._stopping.is_set():
            reason = self._triton_died()
            return InternalFailure(
                f"The model server stopped while running {entry.target} ({reason}). The endpoint is "
                f"restarting it; models are loaded again on their next call, so try again shortly.")
        return InternalFailure(f"The model server did not answer for {entry.target}: {error}.")

    # -- listing -------------------------------------------------------------------------------

    def listing(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "endpoint": self.settings.endpoint_name,
            "model_store": None if self.store is None else self.store.url,
            "cache": None if self.cache is None else str(self.cache.root),
            "triton": {"pid": self.triton.pid, "running": self.triton.is_running(),
                       "starts": self.triton.starts,
                       "restarting": None if registry is None else registry.triton_down},
            "limits": None if registry is None else registry.usage(),
            "requests": self.requests_total,
            "invocations": self.invocations_total,
            "models": [] if registry is None else registry.snapshot(),
        }


def _model_unknown_to_triton(answer) -> bool:
    return answer.status == 404 or (answer.status == 400 and "Request for unknown model" in answer.text)


def serve_until_signalled(endpoint: LocalEndpoint) -> int:
    """Run until SIGINT/SIGTERM, then stop the front and tritonserver; the exit status.

    The handler only writes a byte to a pipe the main thread reads: a handler runs on the main
    thread between any two bytecodes, and one that set a threading.Event while the main thread
    was inside that Event's wait (its lock held) deadlocked, leaving the endpoint, tritonserver
    and a stub running after their studio was killed (seen once, py-spy showed the handler
    blocked in Event.set)."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def on_signal(signum: int, frame: object) -> None:
        try:
            os.write(wake_write, b"x")
        except BlockingIOError:  # the pipe is full: a stop is asked for already
            pass

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        endpoint.start()  # cleans up after itself when it fails
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_read)
        os.close(wake_write)
        raise
    try:
        print(f"local endpoint {endpoint.settings.endpoint_name} at {endpoint.url} "
              f"(boto3: endpoint_url='{endpoint.url}'); Ctrl-C to stop", flush=True)
        os.read(wake_read, 1)  # until a signal's byte (PEP 475: retried after each handler)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        os.close(wake_read)
        os.close(wake_write)
        log.info("stopping")
        code = endpoint.stop()
        log.info("stopped (tritonserver exit code %s)", code)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
