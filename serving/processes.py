"""Process helpers shared by every part that starts a process: ports, process groups, children
that end with their parent, waiting for a server to answer.

Standard library only, so any room may use it (the studio starts its own local endpoint with it).
"""

from __future__ import annotations

import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent() -> None:
    """A child's preexec_fn: the kernel sends it SIGTERM when the thread that started it ends,
    however that happens (SIGKILL included), so nothing the project starts outlives its parent.

    The signal follows the *thread*: start long-lived children from a thread that lives as long
    as they should (the main thread, or a watchdog's).

    tritonserver's Python-backend stubs are its children, not ours: told SIGTERM, tritonserver
    unloads its models, which ends them, and killed outright it leaves them to notice that their
    parent is gone, which they do within a second (tests/test_load_faults.py kills an endpoint
    and a studio under load and finds no tritonserver or stub left).
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (there is a small window before Triton binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Triton sets SO_REUSEADDR too: sockets in TIME_WAIT must not count as "taken".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a pgid reused by someone else's process: not ours
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, e.g. a server and its stubs."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether anything of the group is left
        return [pgid] if killpg(pgid, 0) else []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ..."; comm may contain spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class ServerStartError(RuntimeError):
    """A server process that exited, or did not answer in time, while it was starting."""


def answers(url: str, timeout_s: float = 5) -> bool:
    """Whether an HTTP GET of ``url`` gets a successful answer now (not an error status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, 4xx/5xx, half an answer
        return False


def wait_until_answers(url: str, process: subprocess.Popen | None = None, *, timeout_s: float,
                       what: str = "the server", interval_s: float = 0.5,
                       stopping: threading.Event | None = None) -> None:
    """Poll ``url`` until it answers (see ``answers``); raise ServerStartError when ``process``
    exits first, when ``timeout_s`` pass, or when ``stopping`` is set meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        if stopping is not None and stopping.is_set():
            raise ServerStartError(f"{what} was being stopped while it started")
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"{what} exited with status {process.returncode} while starting")
        if answers(url):
            return
        if time.monotonic() >= deadline:
            raise ServerStartError(f"{what} did not answer {url} within {timeout_s:.0f} s")
        time.sleep(interval_s)


def stop_process(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM (a server's cue to stop what it started), SIGKILL if it has not ended after
    ``timeout_s``; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
