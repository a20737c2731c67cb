"""Strangers beside the designers (`python -m bench.load --hostile`): clients that never sign in,
flooding what a public studio accepts from anyone who finds it, each kind on its own threads:

  uploads   POST /gradio_api/upload, several 1 MB files a request
  layers    POST /gradio_api/queue/join, an Erase run whose editor value names 64 layers
  logins    POST /login, unknown names and wrong passwords for a designer's name
  jobs      POST /gradio_api/call/generate and /gradio_api/queue/join with a Generate job

Bounded in rate (DEFAULT_RATE_PER_KIND, --hostile-rate), count (MAX_REQUESTS_PER_KIND) and time
(the run's), and only ever 127.0.0.1. What
each request was answered (status codes) is counted; an attack that got a 2xx is a finding.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlparse


UPLOAD_FILES, UPLOAD_FILE_BYTES = 4, 1024 * 1024
EDITOR_LAYERS = 64
THREADS_PER_KIND = 2
# Requests a second of each kind, all its threads together: five times the login rate that
# stalled the studio before its sign-in left the event loop (8 a second). Unpaced, the strangers'
# refusals alone fill a core of this 2-core machine (~750 a second), which measures the machine;
# a public studio gets per-address connection limits from the proxy in front of it.
DEFAULT_RATE_PER_KIND = 40.0
MAX_REQUESTS_PER_KIND = 20_000
REQUEST_TIMEOUT_S = 30
# A stranger's request answered with one of these was let in: the studio did work for them.
LET_IN = range(200, 300)
BOUNDARY = "stranger-boundary"


@dataclass(frozen=True)
class Attack:
    """One request a stranger sends again and again: no cookie, a plain connection each time
    (http.client: the strangers' own CPU stays small on the machine they share with the studio)."""

    path: str
    body: bytes
    content_type: str


def _json(path: str, body: dict) -> Attack:
    return Attack(path, json.dumps(body).encode(), "application/json")


def _uploads(_: tuple[str, ...]) -> Attack:
    payload = os.urandom(UPLOAD_FILE_BYTES)  # random: nothing on the way compresses it
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="stranger-{index}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + payload + b"\r\n" for index in range(UPLOAD_FILES)]
    return Attack("/gradio_api/upload", b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(),
                  f"multipart/form-data; boundary={BOUNDARY}")


def _layers(_: tuple[str, ...]) -> Attack:
    layer = {"path": "/tmp/gradio/stranger/layer.png", "meta": {"_type": "gradio.FileData"}, "orig_name": "l.png"}
    editor = {"background": layer, "layers": [layer] * EDITOR_LAYERS, "composite": layer}
    return _json("/gradio_api/queue/join", {"data": [[], editor, "a prompt"], "fn_index": 3,
                                            "session_hash": secrets.token_hex(6), "event_data": None,
                                            "trigger_id": None})


def _logins(names: tuple[str, ...]) -> Attack:
    # Half of the guesses are for a real designer's name: the lockout must not lock them out.
    name = secrets.choice(names) if names and secrets.randbelow(2) else f"stranger-{secrets.token_hex(4)}"
    form = urlencode({"username": name, "password": secrets.token_urlsafe(12)}).encode()
    return Attack("/login", form, "application/x-www-form-urlencoded")


def _jobs(_: tuple[str, ...]) -> Attack:
    if secrets.randbelow(2):
        return _json("/gradio_api/call/generate", {"data": ["a prompt"]})
    return _json("/gradio_api/queue/join", {"data": ["a prompt"], "fn_index": 0, "session_hash": secrets.token_hex(6),
                                            "event_data": None, "trigger_id": None})


KINDS: dict[str, Callable[[tuple[str, ...]], Attack]] = {"uploads": _uploads, "layers": _layers, "logins": _logins,
                                                          "jobs": _jobs}


def send(host: str, port: int, attack: Attack) -> str:
    """The status the studio answered, or why there was none (refused mid-body, reset)."""
    connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", attack.path, body=attack.body,
                           headers={"Content-Type": attack.content_type, "Connection": "close"})
        response = connection.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        connection.close()


@dataclass
class Strangers:
    """The hostile clients of one run: started with `start`, stopped with `stop`; `figures` then
    says per kind how many requests were sent and how each was answered."""

    url: str
    designer_names: tuple[str, ...] = ()
    threads_per_kind: int = THREADS_PER_KIND
    rate_per_kind: float = DEFAULT_RATE_PER_KIND
    max_requests: int = MAX_REQUESTS_PER_KIND
    answers: dict[str, Counter] = field(default_factory=dict)
    cpu_s: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        where = urlparse(self.url)
        if where.hostname != "127.0.0.1":
            raise ValueError("strangers are sent only to a studio on 127.0.0.1")
        self.host, self.port = where.hostname, where.port or 80
        self.answers = {kind: Counter() for kind in KINDS}
        self._sent = Counter()

    def start(self) -> Strangers:
        for kind in KINDS:
            for index in range(self.threads_per_kind):
                thread = threading.Thread(target=self._attack, args=(kind,), daemon=True,
                                          name=f"stranger {kind} {index}")
                self._threads.append(thread)
                thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        """Until every stranger has sent its max_requests (or was stopped)."""
        for thread in self._threads:
            thread.join()

    def _attack(self, kind: str) -> None:
        make = KINDS[kind]
        attack = make(self.designer_names)  # an upload's megabytes made once; the rest each time
        interval = self.threads_per_kind / self.rate_per_kind
        due = time.monotonic()
        while not self._stop.wait(max(0.0, due - time.monotonic())) and self._reserve(kind):
            due += interval
            answer = send(self.host, self.port, attack)
            if kind != "uploads":
                attack = make(self.designer_names)
            with self._lock:
                self.answers[kind][answer] += 1
        with self._lock:
            self.cpu_s += time.thread_time()  # what the strangers took of the machine the studio runs on

    def _reserve(self, kind: str) -> bool:
        """Whether one more request of this kind may go (at most max_requests, all threads together)."""
        with self._lock:
            if self._sent[kind] >= self.max_requests:
                return False
            self._sent[kind] += 1
            return True

    def figures(self) -> dict:
        with self._lock:
            kinds = {kind: dict(answers) for kind, answers in self.answers.items()}
        let_in = {kind: sum(count for answer, count in answers.items() if answer.isdigit() and int(answer) in LET_IN)
                  for kind, answers in kinds.items()}
        # A wrong password is never a success; the other kinds must not be let in without a sign-in.
        return {"answers": kinds, "let_in": let_in, "sent": sum(sum(a.values()) for a in kinds.values()),
                "cpu_s": self.cpu_s}
