"""Process helpers shared by every part that starts a process: ports, process groups, children
that end with their parent, waiting for a server to answer.

Standard library only, so any room may use it (the studio starts its own local endpoint with it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
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
