"""The studio under load and its process tree: a studio this tool starts (and starts again after
kill-studio) or one already running that it attaches to, and its processes by role (studio,
endpoint, tritonserver, each model's Python-backend stub)."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

from bench.harness import build_store
from serving.local_endpoint.__main__ import build_parser as endpoint_parser
from studio.access import hash_password
from studio.process import StudioProcess

ORPHAN_LIMIT_S = 60  # a killed parent's children must be gone by then (graceful stops included)
STUB_MODEL = re.compile(r"/models/([^/]+?)-[0-9a-f]{16}/repo")  # the cache folder: the TargetModel's slug
MAX_ACCOUNTS = 16  # designers a signed-in run can have (bench.load's MAX_DESIGNERS)
STARTUP_TIMEOUT_S = 600  # the studio serves its page once its endpoint answers: Triton's first start


def processes(studio_pid: int) -> dict[str, psutil.Process]:
    """The studio's live process tree by role: studio, endpoint, tritonserver, "stub <model>"."""
    found: dict[str, psutil.Process] = {}
    try:
        studio = psutil.Process(studio_pid)
    except psutil.Error:
        return found
    found["studio"] = studio
    for endpoint in _live_children(studio):
        if "serving.local_endpoint" in _cmdline(endpoint):
            found["endpoint"] = endpoint
            for triton in _live_children(endpoint):
                if Path(next(iter(_cmdline(triton)), "")).name == "tritonserver":
                    found["tritonserver"] = triton
                    for stub in _live_children(triton):
                        match = STUB_MODEL.search(" ".join(_cmdline(stub)))
                        found[f"stub {match.group(1).removesuffix('.tar.gz') if match else stub.pid}"] = stub
    return found


def _live_children(process: psutil.Process) -> list[psutil.Process]:
    # A killed stub stays a zombie until tritonserver reaps it: not one of the tree's processes.
    try:
        return [child for child in process.children() if alive(child)]
    except psutil.Error:
        return []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # ended while we looked: the next look sees the new tree
        return []


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(left: list[psutil.Process], limit_s: float = ORPHAN_LIMIT_S) -> tuple[float, list[str]]:
    """(seconds until none of ``left`` was alive, the ones still alive at the limit)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if not any(alive(p) for p in left):
            return time.monotonic() - started, []
        time.sleep(0.2)
    return time.monotonic() - started, [f"{p.name()} (pid {p.pid})" for p in left if alive(p)]


def listening_pid(port: int) -> int | None:
    """The process listening on a 127.0.0.1 port (an attached studio)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None


@dataclass
class EndpointPlaces:
    """Where the studio's local endpoint serves and finds its models (from its command line)."""

    url: str
    model_store: Path


class Studio:
    """The studio under load: started here (and started again after kill-studio), or attached.

    With ``sign_in`` the studio started here takes designers from a users file written for the
    run (MAX_ACCOUNTS designers, random passwords): the designers sign in, strangers cannot."""

    def __init__(self, work: Path, url: str | None = None, *, sign_in: bool = False):
        self.work = work
        self.accounts: dict[str, str] = {}
        if sign_in:
            if url:
                raise ValueError("sign_in needs a studio this tool starts (it writes the users file)")
            self.accounts = {f"designer-{index}": secrets.token_urlsafe(16) for index in range(MAX_ACCOUNTS)}
        self.launcher: StudioProcess | None = None if url else self._launcher()
        self.url = url or self.launcher.url
        self.pid = listening_pid(urlparse(url).port) if url else None

    def _launcher(self) -> StudioProcess:
        """`python -m studio` with its own local endpoint on this run's store, cache and results."""
        endpoint_args = ["--model-store", str(self.work / "store"), "--cache-dir", str(self.work / "cache"),
                         "--log-dir", str(self.work / "endpoint-logs"), "--no-build"]
        wrapper = []
        if os.geteuid() == 0:
            # Root reads any file whatever its mode: without these two capabilities the studio and
            # everything it starts obey file permissions, as a service account does (unreadable-store).
            wrapper = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
        sign_in = []
        if self.accounts:
            users = self.work / "users.txt"
            users.parent.mkdir(parents=True, exist_ok=True)
            users.write_text("".join(f"{name}:{hash_password(password)}\n" for name, password in self.accounts.items()))
            sign_in = ["--users-file", str(users)]
        return StudioProcess("--results-dir", str(self.work / "results"), "--jobs-per-minute", "100000",
                             "--work-per-day", "1000000000", "--daily-budget", "1000000000", *sign_in,
                             "--local-endpoint-args", shlex.join(endpoint_args),
                             log=self.work / "studio.log", wrapper=wrapper, startup_timeout_s=STARTUP_TIMEOUT_S,
                             stop_timeout_s=120)

    @property
    def started_here(self) -> bool:
        return self.launcher is not None and self.launcher.process is not None

    def start(self) -> Studio:
        """Start it (again, after kill-studio: same port, store, cache and results) and wait until
        it serves its page, which it does once the endpoint it starts answers /ping."""
        if not (self.work / "store").is_dir():
            build_store(self.work / "store")
        self.launcher.start()
        self.pid = self.launcher.pid
        return self

    def wait_exit(self) -> None:
        """Until the studio this tool started has exited (killed by a fault)."""
        self.launcher.process.wait()

    def account(self, index: int) -> tuple[str, str] | None:
        """The (name, password) designer ``index`` signs in with; None where nobody signs in."""
        if not self.accounts:
            return None
        name = f"designer-{index % MAX_ACCOUNTS}"
        return name, self.accounts[name]

    def read(self, url: str, cookies: dict[str, str] | None = None) -> bytes:
        """A file the studio serves (a result), fetched as the designer whose cookies these are."""
        response = httpx.get(url, cookies=cookies, timeout=60)
        response.raise_for_status()
        return response.content

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()  # SIGTERM: it stops its endpoint

    def processes(self) -> dict[str, psutil.Process]:
        return processes(self.pid) if self.pid else {}

    def endpoint(self) -> EndpointPlaces:
        endpoint = self.processes().get("endpoint")
        if endpoint is None:
            raise RuntimeError("the studio has no local endpoint of its own (it was given --endpoint-url or "
                               "--endpoint-name): this fault needs one")
        command = endpoint.cmdline()
        args = endpoint_parser().parse_args(command[command.index("serving.local_endpoint") + 1:])
        return EndpointPlaces(f"http://127.0.0.1:{args.port}", Path(args.model_store).resolve())


@contextmanager
def started_studio(work: Path) -> Iterator[Studio]:
    """A studio of its own (and its local endpoint) in ``work``, stopped at the end."""
    work.mkdir(parents=True, exist_ok=True)
    studio = Studio(work)
    try:
        yield studio.start()
    finally:
        studio.stop()
