"""The tiers' guard (tests/process_support.py): an unmarked test that starts a process, a moto
server or a pipeline fails, saying which mark to add; and the marks it knows are the declared ones."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from serving import weights
from tests.process_support import FAST_TIER, PROCESS_MARKS, Guard, UnmarkedStart

ROOT = Path(__file__).resolve().parents[1]


class Item:
    nodeid = "tests/test_x.py::test_y"


STARTS = {
    "subprocess.run": lambda: subprocess.run([sys.executable, "-c", "pass"]),
    "Popen": lambda: subprocess.Popen(["true"]),
    "os.system": lambda: os.system("true"),
    "multiprocessing (spawn)": lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
    "multiprocessing (fork)": lambda: multiprocessing.get_context("fork").Process(target=print).start(),
    "moto server": lambda: ThreadedMotoServer(ip_address="127.0.0.1", port=0).start(),
    "tiny pipeline": lambda: weights.build_tiny_pipeline("sd_base"),
}


@pytest.mark.parametrize("start", STARTS.values(), ids=STARTS.keys())
def test_an_unmarked_start_is_refused_naming_the_mark(start):
    guard = Guard(Item())
    with guard.active(), pytest.raises(UnmarkedStart, match=r"test_x.py::test_y .* add @pytest.mark.(process|aws|pipeline)"):
        start()
    with pytest.raises(pytest.fail.Exception, match="carries none of the marks"):
        guard.check()  # even when the code under test swallowed the error


@pytest.mark.parametrize(("command", "mark"), [
    ([sys.executable, "-m", "studio", "--port", "1"], "studio"),
    ([sys.executable, "-m", "serving.local_endpoint"], "triton"),
    (["/usr/bin/chromium", "--headless"], "browser"),
    (["git", "ls-files"], "process"),
])
def test_the_refusal_names_the_mark_for_what_was_started(command, mark):
    with Guard(Item()).active(), pytest.raises(UnmarkedStart, match=f"add @pytest.mark.{mark} "):
        subprocess.run(command)


def test_the_guard_is_lifted_afterwards():
    def hooks():
        return subprocess._fork_exec, os.system, os.fork, ThreadedMotoServer.__dict__["start"], weights.build_tiny_pipeline

    before = hooks()
    with Guard(Item()).active():
        assert all(now is not then for now, then in zip(hooks(), before))
    assert hooks() == before


def test_the_marks_are_the_declared_ones_and_make_check_leaves_them_out():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in declared["addopts"]
    assert [line.split(":")[0] for line in declared["markers"]] == list(PROCESS_MARKS)
    assert FAST_TIER == "not (triton or pipeline or studio or browser or aws or process)"
    assert f"FAST_TIER := {FAST_TIER}\n" in (ROOT / "Makefile").read_text()  # what `make check` runs
