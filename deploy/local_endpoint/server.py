"""The HTTP front: SageMaker Runtime's InvokeEndpoint API in front of tritonserver.

Routes (all on one port, 127.0.0.1 by default):

* ``POST /endpoints/<EndpointName>/invocations`` - what boto3's ``sagemaker-runtime``
  ``invoke_endpoint`` sends. Request headers used: ``X-Amzn-SageMaker-Target-Model`` (required:
  this is a multi-model endpoint), ``Content-Type`` and ``Accept`` (forwarded to Triton),
  ``X-Amzn-SageMaker-Custom-Attributes`` (forwarded, and echoed back). SigV4 signatures are
  accepted without being checked, and never logged.
* ``GET /ping`` - 200 when tritonserver is up, 503 while starting or restarting.
* ``GET /models`` - every model the endpoint knows: state, size, last use, counters; plus the
  budget. ``GET /models/<TargetModel>`` - one of them.

Answers as SageMaker gives them: the model's body and ``Content-Type``,
``x-Amzn-Invoked-Production-Variant: AllTraffic``, ``X-Amzn-SageMaker-Custom-Attributes`` (the
model's own when it sets one - Triton never does - otherwise the request's value echoed back;
absent when neither has one), ``x-amzn-RequestId``. Errors carry ``x-amzn-ErrorType`` and a JSON
body, so boto3 raises the same exception classes as on AWS (see errors.py).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from deploy.archive import REPO_ROOT

from .cache import ModelCache
from .errors import (
    LOCAL_ACCOUNT,
    EndpointError,
    InternalFailure,
    ServiceUnavailable,
    UnknownOperation,
    ValidationError,
    model_error,
)
from .registry import Limits, ModelEntry, ModelRegistry
from .store import ModelStore, build_missing_archives, check_target, open_store
from .triton import TARGET_HEADER, TritonBackend, TritonUnreachable

log = logging.getLogger("deploy.local_endpoint")
access_log = logging.getLogger("deploy.local_endpoint.access")

MAX_REQUEST_BYTES = 6 * 1024 * 1024  # invoke_endpoint's limit (6,291,456 bytes)
DRAIN_LIMIT = 64 * 1024 * 1024  # an oversized body up to this is read and answered; beyond, cut
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
CUSTOM_ATTRIBUTES_MAX = 1024
DEFAULT_STORE = REPO_ROOT / "build" / "model-store"
DEFAULT_CACHE = REPO_ROOT / "build" / "model-cache"
DEFAULT_LOG_DIR = REPO_ROOT / "build" / "local-endpoint"
DEFAULT_REPOSITORY = REPO_ROOT / "serving" / "models"
INVOCATIONS = re.compile(r"/endpoints/([^/]+)/invocations")


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
    max_gb: float | None = None
    load_wait_s: float = 60.0
    load_timeout_s: float = 900.0
    invoke_timeout_s: float = 600.0
    retry_failed_after_s: float = 300.0
    max_archive_gb: float = 30.0
    log_dir: Path = DEFAULT_LOG_DIR
    triton_startup_timeout_s: float = 300.0
    model_config_name: str | None = "auto"  # "cpu" without a GPU, config.pbtxt with one
    variant_name: str = "AllTraffic"
    extra: dict[str, Any] = field(default_factory=dict)

    def limits(self) -> Limits:
        return Limits(max_models=self.max_models or None,
                      max_bytes=None if self.max_gb is None else int(self.max_gb * 2**30),
                      load_wait_s=self.load_wait_s, load_timeout_s=self.load_timeout_s,
                      retry_failed_after_s=self.retry_failed_after_s)


class LocalEndpoint:
    """The front, its tritonserver and the model registry; ``start()``/``stop()`` or ``with``."""

    def __init__(self, settings: EndpointSettings | None = None) -> None:
        self.settings = settings or EndpointSettings()
        self.triton = TritonBackend(log_path=Path(self.settings.log_dir) / "triton.log",
                                    model_config_name=self.settings.model_config_name)
        self.store: ModelStore | None = None
        self.cache: ModelCache | None = None
        self.registry: ModelRegistry | None = None
        self.httpd: _Server | None = None
        self.requests_total = 0
        self.invocations_total = 0
        self._counter_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._restart_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.httpd is None:
            raise RuntimeError("not started")
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def log_hint(self) -> str:
        return f"the endpoint's Triton log {self.triton.log_path}"

    def start(self) -> LocalEndpoint:
        s = self.settings
        # Bind first, so a taken port is reported before anything slow; answer 503 until ready.
        try:
            self.httpd = _Server((s.host, s.port), _Handler, self)
        except OSError as error:
            raise OSError(error.errno, f"cannot listen on {s.host}:{s.port}: {error.strerror}") from None
        self._thread(self.httpd.serve_forever, "http front")
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
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
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
    def ready(self) -> bool:
        return self.registry is not None and not self._stopping.is_set()

    # -- tritonserver death -------------------------------------------------------------------

    def _watch_triton(self) -> None:
        while not self._stopping.wait(0.5):
            if not self.triton.is_running():
                self._triton_died()

    def _triton_died(self) -> str:
        """Record the death (once) and restart tritonserver in the background; the reason."""
        code = self.triton.exit_code()
        reason = f"tritonserver exited unexpectedly with code {code}"
        if self.registry is not None and self.registry.triton_died(reason) and not self._stopping.is_set():
            log.error("%s; restarting it (models are loaded again on their next call)", reason)
            self._thread(self._restart_triton, "triton restart")
        return reason

    def _restart_triton(self) -> None:
        with self._restart_lock:
            while not self._stopping.is_set():
                try:
                    self.triton.restart(timeout=self.settings.triton_startup_timeout_s)
                except Exception as error:  # noqa: BLE001 - keep trying, say why
                    log.error("restarting tritonserver failed: %s; trying again in 5 s", error)
                    self._stopping.wait(5)
                    continue
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
                f"(--invoke-timeout {self.settings.invoke_timeout_s:.0f} s).")}), log_hint=self.log_hint)
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, endpoint: LocalEndpoint) -> None:
        self.endpoint = endpoint
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in one write, and without Nagle's algorithm: otherwise a small
    # answer can sit waiting for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        return "sd-studio-local-endpoint"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - our own log line instead
        pass

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict[str, str], request_id: str) -> None:
        self.send_response_only(status)
        self.send_header("Server", self.version_string())
        self.send_header("Date", self.date_time_string())
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("x-amzn-RequestId", request_id)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        self.wfile.write(b"".join(self._headers_buffer) + (body if self.command != "HEAD" else b""))
        self._headers_buffer = []

    def _send_json(self, status: int, value: Any, request_id: str) -> None:
        self._send(status, json.dumps(value, indent=1).encode(), {"Content-Type": "application/json"}, request_id)

    def _read_body(self) -> bytes:
        """The request body, at most MAX_REQUEST_BYTES (ValidationError beyond, connection kept
        usable up to DRAIN_LIMIT by reading and dropping the rest)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ValidationError("Content-Length is not a number.") from None
        if length > MAX_REQUEST_BYTES:
            if length <= DRAIN_LIMIT:
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            else:
                self.close_connection = True
            raise _too_large(length)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ValidationError("Malformed chunked request body.") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                break
            total += size
            if total > MAX_REQUEST_BYTES:
                self.close_connection = True
                raise _too_large(total)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)
        return b"".join(parts)

    # -- routes --------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def do_PUT(self) -> None:  # noqa: N802
        self._handle()

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        endpoint = self.server.endpoint
        started = time.monotonic()
        request_id = str(uuid.uuid4())
        path = urllib.parse.urlsplit(self.path).path
        target = "-"
        status = 500
        with endpoint._counter_lock:
            endpoint.requests_total += 1
        try:
            match = INVOCATIONS.fullmatch(path)
            if match and self.command == "POST":
                headers = {k.lower(): v for k, v in self.headers.items()}
                target = headers.get(TARGET_HEADER.lower(), "-")
                body = self._read_body()
                status, out, data, target = endpoint.invoke(urllib.parse.unquote(match.group(1)), headers, body)
                self._send(status, data, out, request_id)
            elif path == "/ping" and self.command == "GET":
                self._drain()
                up = endpoint.ready and endpoint.registry.triton_down is None and endpoint.triton.is_running()
                status = 200 if up else 503
                self._send_json(status, {"status": "Healthy" if up else (
                    "Starting" if endpoint.registry is None else "Unhealthy")}, request_id)
            elif path == "/models" and self.command == "GET":
                self._drain()
                status = 200
                self._send_json(status, endpoint.listing(), request_id)
            elif path.startswith("/models/") and self.command == "GET":
                self._drain()
                target = urllib.parse.unquote(path[len("/models/"):])
                entry = endpoint.registry.entry(target) if endpoint.registry else None
                if entry is None:
                    raise UnknownOperation(f"The endpoint has not seen model {target}.")
                status = 200
                self._send_json(status, entry.describe(), request_id)
            else:
                self._drain()
                raise UnknownOperation(f"No route for {self.command} {path}; this endpoint serves "
                                       f"POST /endpoints/<name>/invocations, GET /ping, GET /models.")
        except EndpointError as error:
            status = error.status
            try:
                self._send(error.status, error.body(), error.headers(), request_id)
            except OSError:  # the caller is gone (it timed out, or the endpoint is stopping)
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            status = 499  # the caller hung up before the answer was written
        except Exception as error:  # noqa: BLE001 - answered, logged without the body
            log.exception("request failed")
            failure = InternalFailure(f"The local endpoint failed: {type(error).__name__}: {error}")
            status = failure.status
            try:
                self._send(failure.status, failure.body(), failure.headers(), request_id)
            except OSError:
                self.close_connection = True
        finally:
            level = logging.DEBUG if path == "/ping" else logging.INFO
            access_log.log(level, "%s %s model=%s status=%s %.0f ms", self.command, path, target, status,
                           (time.monotonic() - started) * 1000)

    def _drain(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= DRAIN_LIMIT:
            self.rfile.read(length)
        elif length:
            self.close_connection = True


def _too_large(length: int) -> ValidationError:
    return ValidationError(
        f"Request body is {length} bytes, over invoke_endpoint's limit of {MAX_REQUEST_BYTES} bytes "
        f"(6 MB). Send a smaller image (fewer pixels, or JPEG instead of PNG).")


def serve_until_signalled(endpoint: LocalEndpoint) -> int:
    """Run until SIGINT/SIGTERM, then stop the front and tritonserver; the exit status."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        endpoint.start()  # cleans up after itself when it fails
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    try:
        print(f"local endpoint {endpoint.settings.endpoint_name} at {endpoint.url} "
              f"(boto3: endpoint_url='{endpoint.url}'); Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        log.info("stopping")
        code = endpoint.stop()
        log.info("stopped (tritonserver exit code %s)", code)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
