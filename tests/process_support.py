"""The test tiers: the marks that say what a test starts, and the guard that keeps them true.

Every test that starts something slow carries the mark that names it (pyproject.toml declares
them, and --strict-markers refuses any other):

    triton    a real local Triton server: LocalTriton, the local endpoint in-process
              (start_endpoint, LocalEndpoint.start) or as `python -m serving.local_endpoint`
    pipeline  a diffusers pipeline in-process: built from the tiny recipes or loaded from weights
    studio    the studio's web server, `python -m studio`, as a process
    browser   Debian chromium through Playwright
    aws       moto in server mode (the deploy tests' real boto3 against it)
    process   any other subprocess: a command-line tool, `python -c`, git, the SDK's Python

`make check` runs the tier that carries none of them (FAST_TIER). The guard keeps that tier
honest: while an unmarked test runs, its fixtures included, starting a process or a pipeline
fails it with a message that names the mark to add, so the fast tier cannot grow a slow test
unnoticed. The guard is on in every run, `make test` too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import _posixsubprocess
import pytest
from moto.server import ThreadedMotoServer

PROCESS_MARKS = ("triton", "pipeline", "studio", "browser", "aws", "process")
FAST_TIER = "not (" + " or ".join(PROCESS_MARKS) + ")"


def starts_something(item: pytest.Item) -> bool:
    """Whether the test carries one of the marks that allow it to start a process or a pipeline."""
    return any(item.get_closest_marker(name) is not None for name in PROCESS_MARKS)


class UnmarkedStart(RuntimeError):
    """An unmarked test (or one of its fixtures) started a process, a server or a pipeline."""


def _mark_for_command(command: str) -> str:
    if "tritonserver" in command or "serving.local_endpoint" in command:
        return "triton"
    if "-m studio" in command and "studio." not in command:
        return "studio"
    if "chromium" in command or "playwright" in command:
        return "browser"
    return "process"


def _command(args: object) -> str:
    try:
        return " ".join(os.fsdecode(arg) for arg in list(args)[:4])  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return repr(args)[:200]


class Guard:
    """Refuses, while active, every way a test starts a process, a moto server or a pipeline."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.refusals: list[str] = []

    def _refuse(self, what: str, mark: str) -> UnmarkedStart:
        message = (f"{self.item.nodeid} {what}, but it carries none of the marks "
                   f"{', '.join(PROCESS_MARKS)}: add @pytest.mark.{mark} (or the mark that names what "
                   f"it starts; tests/process_support.py says what each means), so that `make check` "
                   f"leaves it out")
        self.refusals.append(message)
        return UnmarkedStart(message)

    def _refusing(self, what: str, mark: str) -> Callable:
        def refused(*args, **kwargs):
            raise self._refuse(what, mark)
        return refused

    def _fork_exec(self, args, *rest, **kwargs):
        command = _command(args)
        raise self._refuse(f"started a process ({command})", _mark_for_command(command))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with pytest.MonkeyPatch.context() as patch:
            # subprocess (Popen, run, asyncio's subprocesses: Playwright's driver) forks through
            # its own reference to _posixsubprocess.fork_exec (or os.posix_spawn), multiprocessing
            # through the module's.
            patch.setattr(subprocess, "_fork_exec", self._fork_exec)
            patch.setattr(_posixsubprocess, "fork_exec", self._fork_exec)
            for name in ("posix_spawn", "posix_spawnp", "fork", "forkpty", "system"):
                if hasattr(os, name):
                    patch.setattr(os, name, self._refusing(f"started a process (os.{name})", "process"))
            patch.setattr(ThreadedMotoServer, "start", self._refusing("started a moto server", "aws"))
            # Pipelines: only where their modules are imported already (importing diffusers here
            # would cost the fast tier seconds); a test module that builds one imports them.
            pipeline_utils = sys.modules.get("diffusers.pipelines.pipeline_utils")
            if pipeline_utils is not None:
                patch.setattr(pipeline_utils.DiffusionPipeline, "from_pretrained",
                              classmethod(self._refusing("loaded a diffusers pipeline", "pipeline")))
            weights = sys.modules.get("serving.weights")
            if weights is not None:
                patch.setattr(weights, "build_tiny_pipeline",
                              self._refusing("built a tiny diffusers pipeline", "pipeline"))
            yield

    def check(self) -> None:
        """Fail the test for a refusal that the code under test caught and went on past."""
        if self.refusals:
            pytest.fail(self.refusals[0], pytrace=False)


@contextlib.contextmanager
def guarded(item: pytest.Item) -> Iterator[None]:
    """The guard around a phase of an unmarked test; nothing for a marked one."""
    if starts_something(item):
        yield
        return
    guard = Guard(item)
    with guard.active():
        yield
    guard.check()
