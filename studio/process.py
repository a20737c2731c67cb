"""`python -m studio` as a child process, for whatever runs the studio from outside (the tests,
the benchmark, the load and fault tool): started on a free 127.0.0.1 port, awaited until its page
answers, stopped with SIGTERM (the studio then stops the local endpoint it started) and killed if
it does not end.

    with StudioProcess("--endpoint-url", url, "--results-dir", str(results)) as studio:
        Client(studio.url) ...

The options given are its whole configuration: the caller's STUDIO_* and GRADIO_SERVER_*
variables (which the studio reads as defaults of its options) are not passed on, so that a
developer's environment cannot send it to another endpoint, port or host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from serving.processes import ServerStartError, exit_with_parent, find_free_port, stop_process, wait_until_answers

REPO_ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT_LEFT_OUT = ("STUDIO_", "GRADIO_SERVER_")  # prefixes of the variables not passed on
LOG_TAIL_LINES = 20


class StudioStartError(ServerStartError):
    """The studio exited, or did not answer in time, while it was starting."""


class StudioProcess:
    """`python -m studio *options --port PORT`, its page at ``url``.

    ``port``: fixed (it is kept when the studio is started again), or a free one.
    ``log``: a file its output is appended to (None: this process's own stdout and stderr).
    ``wrapper``: a command it runs under (e.g. setpriv ... --).
    ``env``: its environment (default: this process's, less ENVIRONMENT_LEFT_OUT).
    It ends with the thread that started it (exit_with_parent), however that ends.
    ``start`` may be called again once it has exited (a supervisor's restart)."""

    def __init__(self, *options: str, port: int | None = None, log: Path | None = None,
                 wrapper: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 startup_timeout_s: float = 600, stop_timeout_s: float = 90):
        self.port = port or find_free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.command = [*wrapper, sys.executable, "-m", "studio", *options, "--port", str(self.port)]
        self.log = log
        self.env = dict(env) if env is not None else {
            name: value for name, value in os.environ.items() if not name.startswith(ENVIRONMENT_LEFT_OUT)}
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> StudioProcess:
        """Start it and wait until its page answers (it serves it once its endpoint is ready)."""
        if self.running:
            raise RuntimeError(f"the studio is already running (pid {self.pid})")
        if self.log is None:
            self.process = self._popen(None)
        else:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "ab") as log:
                self.process = self._popen(log)
        try:
            wait_until_answers(self.url, self.process, timeout_s=self.startup_timeout_s, what="the studio",
                               interval_s=0.5)
        except ServerStartError as error:
            self.stop()
            raise StudioStartError(f"{error}{self._log_tail()}") from None
        return self

    def _popen(self, log) -> subprocess.Popen:
        return subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT if log is not None else None, preexec_fn=exit_with_parent)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``; its exit status (None: never started)."""
        return stop_process(self.process, self.stop_timeout_s) if self.process is not None else None

    def _log_tail(self) -> str:
        if self.log is None:
            return ""
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return f"; the end of {self.log}:\n" + "\n".join(lines)

    def __enter__(self) -> StudioProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
