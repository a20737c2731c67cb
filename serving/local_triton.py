"""Start the real Triton Inference Server that ships inside the ``nvidia-pytriton`` wheel.

No Docker and no GPU needed: the wheel carries a complete ``tritonserver`` 2.51 binary, its
shared libraries and the Python backend. This module finds them, does the one-time preparation
the wheel leaves undone, and runs the server as a child process in one of two modes:

* model-repository mode: ``tritonserver --model-repository=DIR`` with the KServe v2 HTTP API
  (plus gRPC and metrics), ready when ``GET /v2/health/ready`` answers 200;
* SageMaker multi-model mode: the same binary speaking the SageMaker MME container contract
  (``/ping``, ``POST /models``, ``/models/<name>/invoke``, ...), as the SageMaker Triton
  container runs it, ready when ``GET /ping`` answers 200.

Facts about this binary that the code relies on (checked by experiment on Triton 2.51.0):

* ``--http-address``, ``--grpc-address`` and ``--metrics-address`` exist, so those listeners
  are bound to 127.0.0.1. There is no ``--sagemaker-address``: the SageMaker listener binds
  0.0.0.0 (also when ``--http-address`` is set). In SageMaker mode the launcher preloads
  ``loopback_bind.c`` (built on first use) to turn that wildcard bind into 127.0.0.1.
* ``--allow-http=false --allow-grpc=false --allow-metrics=false`` work together with
  ``--allow-sagemaker=true``; ``--model-repository`` is still required (an empty folder will do).
* ``--model-config-name=cpu`` also applies to models loaded through SageMaker's ``POST /models``:
  ``configs/cpu.pbtxt`` is used, and without the flag a ``KIND_GPU`` config fails with
  "has kind KIND_GPU but no GPUs are available".
* The Python-backend stub runs its embedded Python in isolated mode: PYTHONPATH is ignored
  there. It takes sys.prefix from the first ``python3`` on PATH, so it sees this environment's
  site-packages, where the set-up installed the project (``sdserve`` included) in editable mode.
* In SageMaker mode, ``POST /models`` names the Triton model after the body's ``model_name``;
  with an ``X-Amzn-SageMaker-Target-Model`` header (what SageMaker sends) the header value,
  e.g. ``<model>.tar.gz``, is the Triton model name instead, and invoke/unload must carry the
  same header. (Details in tests/test_local_triton.py.)
* On SIGTERM Triton first waits, up to ``--exit-timeout-secs``, for every open HTTP connection
  to close (idle keep-alive ones too: a client holding one makes the stop take the whole
  timeout and Triton exit with code 1), then for in-flight inferences, unloads the models,
  which ends the Python-backend stub processes, and exits: about two to three seconds when no
  client holds a connection open.

Run ``python -m serving.local_triton --help`` for the command line.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from serving.processes import exit_with_parent, group_members, killpg, pid_alive, port_is_free
from serving.triton_install import (
    TritonInstallation, TritonLaunchError, gpu_available, prepare_triton, server_env,
)

# Port value meaning "the mode's default": a free port in model-repository mode, switched off in
# SageMaker mode (the SageMaker Triton container serves only the SageMaker port).
AUTO = -1

LOG_TAIL_LINES = 40


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

# Strong references on purpose: a server whose LocalTriton object was dropped without stop()
# must still be stopped when this interpreter exits.
_running: "set[LocalTriton]" = set()


@atexit.register
def _stop_leftovers() -> None:
    # A test run or script that forgot stop() must not leave a server (and its ports) behind.
    for triton in list(_running):
        triton.stop(timeout=10)


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "sdserve-triton-"  # then the owning process's pid, a token, and the backend's own name


def remove_shm_regions(prefix: str) -> int:
    """Unlink the shared-memory regions named with `prefix`; how many there were."""
    removed = 0
    for region in SHM_DIR.glob(f"{prefix}*"):
        region.unlink(missing_ok=True)
        removed += 1
    return removed


def remove_orphaned_shm_regions() -> int:
    """Unlink the regions of servers whose owning process is gone (killed before its stop())."""
    removed = 0
    for region in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        owner = region.name[len(SHM_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            region.unlink(missing_ok=True)
            removed += 1
    return removed


class LocalTriton:
    """One tritonserver child process.

    Ports: ``0`` picks a free port, a positive number is used as given (checked before the
    start: a taken port raises TritonLaunchError naming it), ``None`` switches the protocol off,
    and ``AUTO`` (the default) means ``0`` in model-repository mode and off in SageMaker mode,
    except for the SageMaker port itself, which is always on in SageMaker mode.

    ``model_config_name``: ``"auto"`` (default) is ``"cpu"`` when no GPU is visible and None
    (each model's ``config.pbtxt``) when one is; a model without ``configs/<name>.pbtxt`` falls
    back to its ``config.pbtxt``.

    ``load_models``: None loads every model of the repository at start (``--model-control-mode
    =none``); a list loads just those (explicit mode, models can then be loaded and unloaded
    through the repository API). SageMaker mode is always explicit and starts empty.

    Use as a context manager, or ``start()`` / ``stop()``::

        with LocalTriton(Path("serving/models")) as triton:
            client = tritonclient.http.InferenceServerClient(triton.http_address)
    """

    HOST = "127.0.0.1"

    def __init__(
        self,
        model_repository: str | os.PathLike | None = None,
        *,
        sagemaker: bool = False,
        http_port: int | None = AUTO,
        grpc_port: int | None = AUTO,
        metrics_port: int | None = AUTO,
        sagemaker_port: int = 0,
        model_config_name: str | None = "auto",
        load_models: Sequence[str] | None = None,
        shm_default_byte_size: int = 64 * 1024 * 1024,
        shm_growth_byte_size: int = 16 * 1024 * 1024,
        exit_timeout_secs: int = 30,
        log_path: str | os.PathLike | None = None,
        log_verbose: int = 0,
        extra_env: Mapping[str, str] | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.sagemaker = sagemaker
        if model_repository is None and not sagemaker:
            raise ValueError("model_repository is required outside SageMaker mode")
        self.model_repository = Path(model_repository).resolve() if model_repository else None

        def mode_default(port: int | None) -> int | None:
            return (None if sagemaker else 0) if port == AUTO else port

        self._requested_ports: dict[str, int | None] = {
            "http": mode_default(http_port),
            "grpc": mode_default(grpc_port),
            "metrics": mode_default(metrics_port),
            "sagemaker": sagemaker_port if sagemaker else None,
        }
        if not sagemaker and self._requested_ports["http"] is None:
            raise ValueError("model-repository mode needs HTTP (readiness is GET /v2/health/ready)")
        for name, port in self._requested_ports.items():
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name}_port must be 0..65535 or None, not {port}")

        if model_config_name == "auto":
            model_config_name = None if gpu_available() else "cpu"
        if model_config_name is not None and (not model_config_name or any(
                c.isspace() for c in model_config_name)):
            raise ValueError(f"invalid model_config_name {model_config_name!r}")
        self.model_config_name = model_config_name
        self.load_models = list(load_models) if load_models is not None else None
        if sagemaker and self.load_models:
            raise ValueError("SageMaker mode starts empty; load models with POST /models")
        self.shm_default_byte_size = shm_default_byte_size
        self.shm_growth_byte_size = shm_growth_byte_size
        self.exit_timeout_secs = exit_timeout_secs
        self.log_verbose = log_verbose
        self.extra_env = dict(extra_env or {})
        self.extra_args = list(extra_args)

        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)

        self.ports: dict[str, int | None] = {}  # resolved at start()
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._empty_repository: Path | None = None
        # The Python backend's shared-memory regions (one per stub, 64 MB each here) are files in
        # /dev/shm that a killed tritonserver never unlinks: named after this process, they are
        # removed by stop() and, when this process was killed too, by the next start of any.
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"

    # -- addresses ---------------------------------------------------------------------------

    def _url(self, protocol: str) -> str:
        port = self.ports.get(protocol)
        if port is None:
            raise RuntimeError(f"{protocol} is not served (not started, or switched off)")
        return f"http://{self.HOST}:{port}"

    @property
    def http_url(self) -> str:
        """KServe v2 HTTP API, e.g. ``http://127.0.0.1:8000``."""
        return self._url("http")

    @property
    def http_address(self) -> str:
        """``host:port`` as tritonclient.http.InferenceServerClient wants it."""
        return self.http_url.removeprefix("http://")

    @property
    def grpc_address(self) -> str:
        return self._url("grpc").removeprefix("http://")

    @property
    def metrics_url(self) -> str:
        return self._url("metrics") + "/metrics"

    @property
    def sagemaker_url(self) -> str:
        """The SageMaker MME container API (bound on all interfaces; see the module doc)."""
        return self._url("sagemaker")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- log -------------------------------------------------------------------------------------

    def log_tail(self, n: int = LOG_TAIL_LINES) -> list[str]:
        """The last ``n`` lines of the server's stdout+stderr (reads only the end of the file)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                end = pos = log.tell()
                chunk = b""
                while pos > 0 and chunk.count(b"\n") <= n:
                    pos = max(0, pos - 65536)
                    log.seek(pos)
                    chunk = log.read(end - pos)
        except FileNotFoundError:
            return []
        return chunk.decode("utf-8", "replace").splitlines()[-n:]

    def _failure(self, message: str) -> TritonLaunchError:
        # Triton ends its startup with big settings tables; the error lines come before them.
        lines = [line for line in self.log_tail(20 * LOG_TAIL_LINES)
                 if line.strip() and not line.startswith(("|", "+"))]
        tail = "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty)"
        return TritonLaunchError(f"{message}\n--- last lines of {self.log_path} ---\n{tail}")

    # -- command line ----------------------------------------------------------------------------

    def command(self, install: TritonInstallation) -> list[str]:
        """The tritonserver command line for the resolved ports."""
        repository = self.model_repository or self._empty_repository
        args = [
            str(install.binary),
            f"--model-repository={repository}",
            f"--backend-directory={install.backends}",
            f"--cache-directory={install.caches}",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
            f"--log-verbose={self.log_verbose}",
            # Large base64 images travel through the Python backend's shared memory: start
            # big enough for one image request and grow in sizeable steps.
            f"--backend-config=python,shm-default-byte-size={self.shm_default_byte_size}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_byte_size}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            # Every config is complete (generated from the model table, checked by a test). Left on,
            # the Python backend starts a stub for each load only to ask the model to complete its
            # config: torch and diffusers imported twice a load.
            "--disable-auto-complete-config",
        ]
        for protocol in ("http", "grpc", "metrics"):
            port = self.ports[protocol]
            if port is None:
                args.append(f"--allow-{protocol}=false")
            else:
                args += [f"--{protocol}-port={port}", f"--{protocol}-address={self.HOST}"]
        if self.sagemaker:
            args += ["--allow-sagemaker=true", f"--sagemaker-port={self.ports['sagemaker']}",
                     "--model-control-mode=explicit"]
        elif self.load_models is not None:
            args.append("--model-control-mode=explicit")
            args += [f"--load-model={name}" for name in self.load_models]
        else:
            args.append("--model-control-mode=none")
        if self.model_config_name:
            args.append(f"--model-config-name={self.model_config_name}")
        return args + self.extra_args

    def _resolve_ports(self) -> None:
        # Explicit ports are checked first, so a taken one is reported before anything starts.
        # The SageMaker listener is checked on 0.0.0.0, what Triton asks for before the loopback
        # shim narrows it: a port free there is free on 127.0.0.1 too.
        hosts = {"http": self.HOST, "grpc": self.HOST, "metrics": self.HOST, "sagemaker": "0.0.0.0"}
        for protocol, port in self._requested_ports.items():
            if port and not port_is_free(port, hosts[protocol]):
                raise TritonLaunchError(f"port {port} (requested for {protocol}) is already in "
                                        f"use on {hosts[protocol]}; pick another or pass 0")
        # Free ports are picked while the earlier picks are still held, so they all differ.
        held: list[socket.socket] = []
        try:
            ports: dict[str, int | None] = {}
            for protocol, port in self._requested_ports.items():
                if port == 0:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    held.append(sock)
                    sock.bind((hosts[protocol], 0))
                    port = sock.getsockname()[1]
                ports[protocol] = port
        finally:
            for sock in held:
                sock.close()
        self.ports = ports

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> "LocalTriton":
        """Start the server and wait until it is ready; raises TritonLaunchError otherwise."""
        if self.is_running():
            raise RuntimeError(f"already running (pid {self.pid})")
        if self.model_repository is not None and not self.model_repository.is_dir():
            raise TritonLaunchError(f"model repository {self.model_repository} is not a folder")
        install = prepare_triton()
        env = server_env(install, sagemaker=self.sagemaker, extra_env=self.extra_env)
        remove_orphaned_shm_regions()

        # A free port picked here can be taken by someone else before Triton binds it: retry
        # with fresh picks in that case (only when no port was fixed by the caller).
        auto_only = all(p in (0, None) for p in self._requested_ports.values())
        for attempt in range(3):
            self._resolve_ports()
            try:
                return self._launch(install, env, timeout)
            except TritonLaunchError as exc:
                if not (auto_only and attempt < 2 and "already in use" in str(exc)):
                    raise

        raise AssertionError("unreachable")

    def _launch(self, install: TritonInstallation, env: dict[str, str],
                timeout: float) -> "LocalTriton":
        started = time.monotonic()
        if self.model_repository is None:
            # Triton insists on --model-repository even in SageMaker mode, where POST /models
            # registers each model's own folder: give it an empty one (removed by stop()).
            self._empty_repository = Path(tempfile.mkdtemp(prefix="triton-sagemaker-empty-"))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command(install))}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(install), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, cwd=str(self.model_repository or
                                                           self._empty_repository),
                # Its own process group: stop() can reach the Python-backend stubs too, and a
                # Ctrl-C in the terminal goes to us (we stop the server cleanly), not to it.
                start_new_session=True, preexec_fn=exit_with_parent)
        _running.add(self)

        ready_url = (self._url("sagemaker") + "/ping" if self.sagemaker
                     else self._url("http") + "/v2/health/ready")
        deadline = started + timeout
        try:
            while True:
                code = self._process.poll()
                if code is not None:
                    raise self._failure(f"tritonserver exited with code {code} before it was "
                                        f"ready")
                if _http_status(ready_url) == 200:
                    self.startup_seconds = time.monotonic() - started
                    return self
                if time.monotonic() > deadline:
                    raise self._failure(f"tritonserver was not ready at {ready_url} "
                                        f"within {timeout:.0f} s")
                time.sleep(0.1)
        except BaseException:  # also Ctrl-C while waiting: never leave a half-started server
            self.stop(timeout=10)
            raise

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server; returns its exit code (None if it was not started).

        SIGTERM first: Triton then waits for in-flight requests (up to exit_timeout_secs) and
        unloads the models, which ends their stub processes. After ``timeout`` (default:
        exit_timeout_secs + 10) the whole process group gets SIGKILL. Stubs left behind are
        killed as well, so no process of this server outlives stop().
        """
        process = self._process
        if process is None:
            return None
        if timeout is None:
            timeout = self.exit_timeout_secs + 10
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._cleanup_group()
        remove_shm_regions(self.shm_prefix)
        _running.discard(self)
        if self._empty_repository is not None:
            shutil.rmtree(self._empty_repository, ignore_errors=True)
            self._empty_repository = None
        return process.returncode

    def _cleanup_group(self) -> None:
        # The stubs notice their parent is gone and exit by themselves within moments; give
        # them that chance, then kill whatever of the process group is still alive.
        pgid = self._process.pid
        deadline = time.monotonic() + 3
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(pgid):
            killpg(pgid, signal.SIGKILL)

    def __enter__(self) -> "LocalTriton":
        return self.start() if not self.is_running() else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        mode = "sagemaker" if self.sagemaker else "repository"
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<LocalTriton {mode} {self.model_repository or ''} {self.ports} {state}>"


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _port(text: str) -> int | None:
    return None if text.lower() in ("off", "none") else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.local_triton",
        description="Run the Triton server bundled in the nvidia-pytriton wheel on a model "
                    "repository, or as a SageMaker multi-model container, until Ctrl-C/SIGTERM.")
    parser.add_argument("--model-repository", type=Path,
                        help="Triton model repository (required unless --sagemaker)")
    parser.add_argument("--sagemaker", action="store_true",
                        help="SageMaker multi-model mode: /ping, POST /models, "
                             "/models/<name>/invoke (HTTP/gRPC/metrics off unless given a port)")
    parser.add_argument("--http-port", type=_port, default=AUTO, help="0 = free port, off = none")
    parser.add_argument("--grpc-port", type=_port, default=AUTO, help="0 = free port, off = none")
    parser.add_argument("--metrics-port", type=_port, default=AUTO,
                        help="0 = free port, off = none")
    parser.add_argument("--sagemaker-port", type=int, default=0, help="0 = free port")
    parser.add_argument("--model-config-name", default="auto",
                        help="configs/<NAME>.pbtxt to use; 'auto' = cpu without a GPU, "
                             "'none' = config.pbtxt (default: auto)")
    parser.add_argument("--load-model", action="append", dest="load_models", metavar="NAME",
                        help="load only these models (explicit mode); default: all")
    parser.add_argument("--shm-default-byte-size", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--shm-growth-byte-size", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--log-file", type=Path, help="server log (default: a temp file)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to become ready")
    args = parser.parse_args(argv)
    if not args.sagemaker and args.model_repository is None:
        parser.error("--model-repository is required unless --sagemaker is given")

    config_name = None if args.model_config_name.lower() == "none" else args.model_config_name
    try:
        triton = LocalTriton(
            args.model_repository, sagemaker=args.sagemaker, http_port=args.http_port,
            grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            sagemaker_port=args.sagemaker_port, model_config_name=config_name,
            load_models=args.load_models, shm_default_byte_size=args.shm_default_byte_size,
            shm_growth_byte_size=args.shm_growth_byte_size, log_path=args.log_file,
            log_verbose=args.log_verbose)
    except ValueError as exc:
        parser.error(str(exc))

    # SIGTERM is handled like Ctrl-C: wherever it lands (starting, printing, waiting), the
    # server is stopped; further signals are ignored meanwhile so the stop is not cut short.
    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    started = False
    try:
        print(f"starting tritonserver (log: {triton.log_path}) ...", flush=True)
        triton.start(timeout=args.timeout)
        started = True
        print(f"ready in {triton.startup_seconds:.1f} s, pid {triton.pid}, "
              f"model config: {triton.model_config_name or 'config.pbtxt'}")
        for label, protocol, make in (("HTTP (KServe v2)", "http", lambda: triton.http_url),
                                      ("gRPC", "grpc", lambda: triton.grpc_address),
                                      ("metrics", "metrics", lambda: triton.metrics_url),
                                      ("SageMaker", "sagemaker", lambda: triton.sagemaker_url)):
            if triton.ports.get(protocol) is not None:
                print(f"  {label:16} {make()}")
        print("Ctrl-C to stop.", flush=True)
        while triton.is_running():
            time.sleep(0.5)
    except TritonLaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping ...", flush=True)
        code = triton.stop()
        print(f"stopped (exit code {code})", flush=True)
        return 0 if started else 130
    print("tritonserver exited by itself:\n" + "\n".join(triton.log_tail()), file=sys.stderr)
    triton.stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
