"""The real tritonserver in SageMaker multi-model mode, and the HTTP calls the front makes to it.

Facts this relies on (Triton 2.51, see serving/local_triton.py and tests/test_local_triton.py):

* ``POST /models`` with ``X-Amzn-SageMaker-Target-Model: <name>`` registers ``<name>`` as the
  Triton model; invoke (``POST /models/<name>/invoke``) and unload (``DELETE /models/<name>``)
  must carry the same header, and the path's name must be the body's ``model_name``. Here all
  three are the same string.
* When a model's Python-backend stub process dies, every invoke answers 400 ``Stub process
  '<name>_0_0' is not healthy.`` and the stub is never restarted. The SageMaker ``DELETE`` then
  unloads the model from Triton's core within a second, but keeps the name and folder registered
  and answers only after its full 350 s unload wait - all that time blocking the SageMaker HTTP
  worker thread it runs on, and with it every other connection that thread serves (a later load
  on such a connection hung until the DELETE gave up). So a dead model is unloaded through the
  core's own repository API on Triton's KServe HTTP port (127.0.0.1, answers at once), and the
  reload uses a new name and a new folder (see ModelCache.generation), since the SageMaker layer
  still holds the old ones.
* SageMaker ``POST /models`` is synchronous: it holds its worker thread for the whole load, so
  other connections served by that thread wait meanwhile; ``--sagemaker-thread-count=16`` (twice
  the default) makes that less likely.
* The SageMaker listener has no address flag; serving.local_triton preloads a bind shim that keeps
  it on 127.0.0.1. Its port is a free one.
* Idle keep-alive connections delay Triton's stop by its exit timeout: close() every connection
  before stopping it.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from serving.local_triton import LocalTriton
from serving.processes import group_members

log = logging.getLogger("serving.local_endpoint")

TARGET_HEADER = "X-Amzn-SageMaker-Target-Model"
UNHEALTHY_STUB = ("Stub process", "is not healthy")


class TritonUnreachable(ConnectionError):
    """No answer from tritonserver (refused, reset or timed out)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class TritonAnswer:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def stub_crashed(self) -> bool:
        return all(part in self.text for part in UNHEALTHY_STUB)


class ConnectionPool:
    """Keep-alive http.client connections to one host:port, safe to share between threads.

    ``close()`` shuts down idle and in-use connections alike: an in-flight request then fails
    at once instead of holding tritonserver's stop for its exit timeout.
    """

    def __init__(self, host: str, port: int, *, max_idle: int = 16) -> None:
        self.host, self.port = host, port
        self.max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._all: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> TritonAnswer:
        # One retry on a fresh connection when a kept-alive one turns out to be closed.
        for attempt in (1, 2):
            connection, reused = self._get(timeout)
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                data = response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine) as error:
                self._discard(connection)
                if reused and attempt == 1:
                    continue
                raise TritonUnreachable(f"tritonserver closed the connection ({error})") from None
            except TimeoutError:
                self._discard(connection)
                raise TritonUnreachable(f"no answer from tritonserver within {timeout:.0f} s",
                                        timed_out=True) from None
            except OSError as error:
                self._discard(connection)
                raise TritonUnreachable(f"cannot reach tritonserver ({error})") from None
            if response.will_close:
                self._discard(connection)
            else:
                self._put(connection)
            return TritonAnswer(status=response.status, body=data,
                                content_type=response.getheader("Content-Type") or "",
                                headers={k.lower(): v for k, v in response.getheaders()})
        raise AssertionError("unreachable")

    def _get(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._closed:
                raise TritonUnreachable("the endpoint is stopping")
            if self._idle:
                connection = self._idle.pop()
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
                return connection, True
            connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._all.add(connection)
            return connection, False

    def _put(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(connection)
                return
        self._discard(connection)

    def _discard(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            self._all.discard(connection)
            if connection in self._idle:
                self._idle.remove(connection)
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._all)
            self._all.clear()
            self._idle.clear()
        for connection in connections:
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            connection.close()


class TritonBackend:
    """One tritonserver in SageMaker MME mode; ``restart()`` replaces it after a death."""

    def __init__(self, *, log_path: Path, exit_timeout_secs: int = 10,
                 model_config_name: str | None = "auto", compute_threads: int | None = None) -> None:
        if compute_threads is not None and compute_threads < 1:
            raise ValueError(f"compute_threads must be at least 1, not {compute_threads}")
        self.log_path = Path(log_path)
        # torch sizes its CPU thread pool from OMP_NUM_THREADS; the stubs inherit tritonserver's env.
        self.extra_env = {} if compute_threads is None else {"OMP_NUM_THREADS": str(compute_threads)}
        # OpenMP threads waiting for each other spin by default. This endpoint shares its machine (a
        # studio, clients, other models' stubs): with more threads than free cores a spinning one
        # holds the core its partner needs, and a 64 px call of a tiny model took over 8 s on two
        # busy cores instead of one. Waiting threads sleep instead, unless the caller's environment
        # says otherwise.
        self.extra_env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        self.exit_timeout_secs = exit_timeout_secs
        self.model_config_name = model_config_name
        self.server: LocalTriton | None = None
        self.pool: ConnectionPool | None = None  # the SageMaker port
        self.core_pool: ConnectionPool | None = None  # the KServe port (127.0.0.1), for unloads only
        self.starts = 0
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        with self._lock:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            server = LocalTriton(sagemaker=True, sagemaker_port=0, http_port=0, log_path=self.log_path,
                                 exit_timeout_secs=self.exit_timeout_secs,
                                 model_config_name=self.model_config_name,
                                 extra_args=["--sagemaker-thread-count=16"], extra_env=self.extra_env)
            server.start(timeout=timeout)
            self.server = server
            self.pool = ConnectionPool(LocalTriton.HOST, server.ports["sagemaker"])
            self.core_pool = ConnectionPool(LocalTriton.HOST, server.ports["http"], max_idle=2)
            self.starts += 1
            log.info("tritonserver pid %s ready in %.1f s (SageMaker port %s, log %s)", server.pid,
                     server.startup_seconds, server.ports["sagemaker"], self.log_path)

    def stop(self) -> int | None:
        with self._lock:
            for pool in (self.pool, self.core_pool):
                if pool is not None:
                    pool.close()  # first: open connections would hold Triton's stop
            code = self.server.stop() if self.server is not None else None
            return code

    def restart(self, timeout: float = 180.0) -> None:
        self.stop()
        self.start(timeout)

    def is_running(self) -> bool:
        server = self.server
        return server is not None and server.is_running()

    def exit_code(self) -> int | None:
        server = self.server
        return None if server is None or server._process is None else server._process.poll()

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server else None

    # -- the MME container API ------------------------------------------------------------------

    def _pool(self) -> ConnectionPool:
        pool = self.pool
        if pool is None:
            raise TritonUnreachable("tritonserver is not started")
        return pool

    @staticmethod
    def _path(name: str, suffix: str = "") -> str:
        # The SageMaker layer matches the path's name verbatim (no percent-decoding): names are
        # kept to characters that need no quoting (see registry.triton_model_name).
        return f"/models/{urllib.parse.quote(name, safe='@')}{suffix}"

    def ping(self, timeout: float = 2.0) -> bool:
        try:
            return self._pool().request("GET", "/ping", timeout=timeout).status == 200
        except TritonUnreachable:
            return False

    def load(self, name: str, url: Path, *, timeout: float) -> TritonAnswer:
        body = json.dumps({"model_name": name, "url": str(url)}).encode()
        return self._pool().request("POST", "/models", body=body, timeout=timeout,
                                    headers={TARGET_HEADER: name, "Content-Type": "application/json"})

    def unload(self, name: str, *, timeout: float) -> TritonAnswer:
        return self._pool().request("DELETE", self._path(name), headers={TARGET_HEADER: name},
                                    timeout=timeout)

    def unload_core(self, name: str, *, timeout: float = 30.0) -> TritonAnswer:
        """Unload through Triton's core repository API (for a model whose stub is dead)."""
        pool = self.core_pool
        if pool is None:
            raise TritonUnreachable("tritonserver is not started")
        return pool.request("POST", f"/v2/repository/models/{urllib.parse.quote(name, safe='@')}/unload",
                            body=b"{}", headers={"Content-Type": "application/json"}, timeout=timeout)

    def invoke(self, name: str, body: bytes, headers: dict[str, str], *, timeout: float) -> TritonAnswer:
        return self._pool().request("POST", self._path(name, "/invoke"), body=body, timeout=timeout,
                                    headers={**headers, TARGET_HEADER: name})

    def stub_pids(self, model_folder: Path) -> list[int]:
        """Live Python-backend stubs of the model loaded from ``model_folder`` (matched by path)."""
        pid = self.pid
        if pid is None:
            return []
        needle = str(model_folder).encode() + b"/"
        found = []
        for member in group_members(pid):
            if member == pid:
                continue
            try:
                if needle in Path(f"/proc/{member}/cmdline").read_bytes():
                    found.append(member)
            except OSError:
                continue
        return found
