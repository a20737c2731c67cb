"""Which models are loaded, loading them once, and evicting the least recently used.

Per TargetModel one ``ModelEntry`` with a state::

    absent -> loading -> loaded -> unloading -> absent
                    \\-> failed (remembered with its error)

* A request for a model that is not loaded starts its load in a background thread (only the
  first one does: the others find it ``loading``) and waits up to ``load_wait_s`` for it;
  past that it gets ModelNotReadyException (429) like on AWS, and the load goes on.
* Before a load, least recently used idle models are unloaded until the new one fits: at most
  ``max_models`` loaded and at most ``max_bytes`` of model size, where a model's size is the
  size of its extracted folder (weights dominate it; a pipeline in fp16 on a GPU takes about what
  its fp16 files take, one on a CPU in fp32 more: the default budget allows for that, see
  server.default_max_gb). A model with
  requests in flight is never unloaded: the load waits for one to become idle. Loads (with the
  evictions they need) run one at a time, so the budget is never overshot by racing loads.
* A failed load is remembered with its error, which every request gets at once, and is
  retried only when the archive changes, after ``retry_failed_after_s``, or on a new tritonserver.
* A model whose stub process crashed is dropped (its unload runs in the background) and the
  next request loads it again under a new generation (see ModelCache.generation).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from .cache import ModelCache, folder_size
from .errors import (
    EndpointError,
    InternalFailure,
    ModelError,
    ModelNotReady,
    ServiceUnavailable,
    ValidationError,
    model_error,
)
from .store import ArchiveInfo, ModelStore
from .triton import TritonBackend, TritonUnreachable

log = logging.getLogger("serving.local_endpoint")


class State(str, Enum):
    ABSENT = "absent"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class Limits:
    max_models: int | None = 4
    max_bytes: int | None = None
    load_wait_s: float = 60.0  # a request waits this long for a load, then gets 429
    load_timeout_s: float = 900.0  # POST /models
    unload_timeout_s: float = 120.0
    retry_failed_after_s: float = 300.0
    busy_wait_s: float = 300.0  # how long a load waits for a busy model to become idle


@dataclass
class ModelEntry:
    target: str
    state: State = State.ABSENT
    version: str | None = None
    repo: Path | None = None  # the extracted archive
    folder: Path | None = None  # what Triton loaded (repo, or its copy for generation > 0)
    triton_name: str | None = None
    generation: int = 0
    size_bytes: int = 0
    loaded_at: float | None = None  # wall clock, for the listing
    last_used: float | None = None  # wall clock, for the listing
    last_used_mono: float = 0.0  # for LRU
    in_flight: int = 0
    invocations: int = 0
    loads: int = 0
    evictions: int = 0
    crashes: int = 0
    load_seconds: float | None = None
    # Of load_seconds, what the archive took (download and extraction; nothing once extracted: the
    # cache keeps it, so a reload pays the rest alone).
    archive_seconds: float | None = None
    error: EndpointError | None = None
    failed_version: str | None = None
    failed_at: float = 0.0  # monotonic
    remembered: bool = False  # a failure answered from memory until the archive changes or the cool-down
    attempt: int = 0  # load attempts so far; requests wait for one attempt's outcome

    def touch(self) -> None:
        self.last_used = time.time()
        self.last_used_mono = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "target_model": self.target,
            "state": self.state.value,
            "size_bytes": self.size_bytes,
            "size_gb": round(self.size_bytes / 2**30, 6),
            "last_used": _iso(self.last_used),
            "last_used_epoch": self.last_used,
            "loaded_at": _iso(self.loaded_at),
            "in_flight": self.in_flight,
            "invocations": self.invocations,
            "loads": self.loads,
            "evictions": self.evictions,
            "crashes": self.crashes,
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 3),
            "archive_seconds": None if self.archive_seconds is None else round(self.archive_seconds, 3),
            "triton_model": self.triton_name if self.state is State.LOADED else None,
            "error": None if self.error is None else self.error.message,
        }


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")


def triton_model_name(target: str, generation: int) -> str:
    """The Triton model name: the TargetModel itself, as SageMaker uses it, when it is a plain
    file name; otherwise a readable slug plus a hash. ``@r<N>`` marks a reload after a crash."""
    if _SAFE_NAME.fullmatch(target):
        base = target
    else:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", target)[-80:].lstrip("._-") or "model"
        base = f"{base}-{hashlib.sha256(target.encode()).hexdigest()[:10]}"
    return base if generation == 0 else f"{base}@r{generation}"


class ModelRegistry:
    def __init__(self, store: ModelStore, cache: ModelCache, triton: TritonBackend, limits: Limits,
                 *, log_hint: str = "the endpoint's log", log_stream_arn: str = "") -> None:
        self.store = store
        self.cache = cache
        self.triton = triton
        self.limits = limits
        self.log_hint = log_hint
        self.log_stream_arn = log_stream_arn
        self._cond = threading.Condition()
        self._entries: dict[str, ModelEntry] = {}
        self._load_lock = threading.Lock()  # one load (with its evictions) at a time
        self._triton_down: str | None = None  # why, while tritonserver is being restarted
        self._threads: list[threading.Thread] = []
        cache.in_use = self._uses_folder

    def _uses_folder(self, folder: Path) -> bool:
        """Whether a model this endpoint has loaded (or is loading, unloading) came from there."""
        with self._cond:
            return any(e.repo is not None and e.repo.parent == folder and e.state is not State.ABSENT
                       for e in self._entries.values())

    # -- what the front calls -----------------------------------------------------------------

    def acquire(self, target: str) -> ModelEntry:
        """The loaded entry for ``target``, counted as in flight until ``release``.

        Raises ValidationError for an unknown archive, the error of a failed load (the one this
        request waited for, or a remembered one), ModelNotReady when the load takes longer than
        ``load_wait_s`` (the load goes on).
        """
        deadline = time.monotonic() + self.limits.load_wait_s
        info: ArchiveInfo | None = None
        waited: int | None = None  # the load attempt this request waits for
        while True:
            with self._cond:
                entry = self._entries.get(target)
                if entry is not None and entry.state is State.LOADED and self._triton_down is None:
                    return self._use(entry)
                if entry is not None and entry.state is State.FAILED and entry.attempt == waited:
                    raise copy.copy(entry.error)
                must_start = self._triton_down is None and (
                    entry is None or entry.state in (State.ABSENT, State.FAILED))
            if must_start:
                if info is None:
                    info = self.store.describe(target)  # I/O (an S3 HEAD): outside the lock
                    if info is None:
                        raise self.store.not_found(target)
                with self._cond:
                    entry = self._entries.get(target)
                    if entry is None:
                        entry = self._entries[target] = ModelEntry(target)
                    if entry.state is State.LOADED and self._triton_down is None:
                        return self._use(entry)
                    if entry.state is State.FAILED:
                        if self._remembered(entry, info):
                            raise copy.copy(entry.error)  # remembered: not retried yet
                        entry.state, entry.error = State.ABSENT, None
                    if entry.state is State.ABSENT and self._triton_down is None:
                        entry.state = State.LOADING
                        entry.version = info.version
                        entry.attempt += 1
                        self._spawn(self._load, entry, info, name=f"load {target}")
                        info = None  # a later round (after an eviction, say) asks the store again
            with self._cond:
                entry = self._entries.get(target)
                if entry is not None:
                    if entry.state is State.LOADED and self._triton_down is None:
                        return self._use(entry)
                    if entry.state is State.LOADING:
                        waited = entry.attempt
                    elif entry.state is State.FAILED and entry.attempt == waited:
                        raise copy.copy(entry.error)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._not_ready(target)
                self._cond.wait(min(remaining, 1.0))

    def _remembered(self, entry: ModelEntry, info: ArchiveInfo) -> bool:
        return (entry.remembered and entry.failed_version == info.version
                and time.monotonic() - entry.failed_at < self.limits.retry_failed_after_s)

    def _use(self, entry: ModelEntry) -> ModelEntry:
        entry.in_flight += 1
        entry.invocations += 1
        entry.touch()
        return entry

    def _not_ready(self, target: str) -> ModelNotReady:
        if self._triton_down is not None:
            return ModelNotReady(f"The model server is restarting ({self._triton_down}); "
                                 f"{target} will be loaded again. Wait and try your request again.")
        return ModelNotReady(f"Model {target} is still downloading or loading on the endpoint "
                             f"(waited {self.limits.load_wait_s:.0f} s). Wait and try your request again.")

    def release(self, entry: ModelEntry) -> None:
        with self._cond:
            entry.in_flight -= 1
            entry.touch()
            self._cond.notify_all()

    def crashed(self, entry: ModelEntry, generation: int, detail: str) -> ModelError:
        """The model's stub died: drop it (unload in the background) so the next call reloads it."""
        with self._cond:
            if entry.state is State.LOADED and entry.generation == generation:
                entry.crashes += 1
                entry.generation += 1  # a new Triton name and folder for the reload
                entry.state = State.ABSENT
                entry.loaded_at = None
                name = entry.triton_name
                self._spawn(self._unload_crashed, name, name=f"unload crashed {name}")
                self._cond.notify_all()
                log.warning("model %s crashed (%s); it will be reloaded on the next call", entry.target, detail)
        note = (f"The model {entry.target} crashed (its Triton Python-backend process ended); "
                f"the endpoint dropped it and will load it again on the next call.")
        original = _json_error(f"{note} Triton said: {detail}")
        return model_error(entry.target, 500, original, log_hint=self.log_hint,
                           log_stream_arn=self.log_stream_arn)

    def gone(self, entry: ModelEntry, generation: int) -> None:
        """Triton no longer knows a model we consider loaded: forget it, so it gets reloaded."""
        with self._cond:
            if entry.state is State.LOADED and entry.generation == generation:
                entry.state = State.ABSENT
                entry.generation += 1
                self._cond.notify_all()

    # -- tritonserver death -------------------------------------------------------------------

    def triton_died(self, reason: str) -> bool:
        """Mark every model absent and block requests until ``triton_restarted``; False if known."""
        with self._cond:
            if self._triton_down is not None:
                return False
            self._triton_down = reason
            for entry in self._entries.values():
                # A load that failed on the dying server (say, "Server not ready" while it stopped)
                # says nothing of the new one: it is tried again, not answered from memory.
                if entry.state in (State.LOADED, State.UNLOADING, State.FAILED):
                    entry.state = State.ABSENT
                    entry.loaded_at = None
                    entry.error = None
                entry.generation = 0  # a new server: every name and folder is free again
            self._cond.notify_all()
            return True

    def triton_restarted(self) -> None:
        with self._cond:
            self._triton_down = None
            self._cond.notify_all()

    @property
    def triton_down(self) -> str | None:
        return self._triton_down

    # -- loading and evicting -----------------------------------------------------------------

    def _spawn(self, function, *args, name: str) -> None:
        thread = threading.Thread(target=function, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _load(self, entry: ModelEntry, info: ArchiveInfo) -> None:
        started = time.monotonic()
        try:
            repo = self.cache.extracted(self.store, info)  # download + safe extraction (cached)
            archive_seconds = time.monotonic() - started
            size = folder_size(repo)
            limit = self.limits.max_bytes
            if limit is not None and size > limit:
                raise ValidationError(
                    f"Model {entry.target} is {size / 2**30:.3f} GB (its extracted folder), more than "
                    f"the endpoint may load at once ({limit / 2**30:.3f} GB, --max-gb).")
            with self._load_lock:
                self._make_room(entry, size)
                answer, folder, name, generation = self._post_load(entry, repo)
                if answer.status == 409:  # a name/folder still registered (e.g. after a crash)
                    with self._cond:
                        entry.generation += 1
                    answer, folder, name, generation = self._post_load(entry, repo)
                while answer.status == 507 and self._evict_one(exclude=entry):
                    # Out of memory, as SageMaker does: unload an idle model, try again.
                    answer, folder, name, generation = self._post_load(entry, repo)
            if answer.status != 200:
                raise model_error(entry.target, answer.status, answer.text, log_hint=self.log_hint,
                                  log_stream_arn=self.log_stream_arn,
                                  note="The model could not be loaded.")
        except EndpointError as error:
            self._failed(entry, info, error, started)
            return
        except TritonUnreachable as error:
            self._failed(entry, info, InternalFailure(
                f"Loading {entry.target} failed: {error}."), started, remember=False)
            return
        except Exception as error:  # noqa: BLE001 - reported to the caller, never lost
            log.exception("loading %s failed", entry.target)
            self._failed(entry, info, InternalFailure(f"Loading {entry.target} failed: {error}"), started)
            return
        with self._cond:
            entry.state = State.LOADED
            entry.repo, entry.folder, entry.triton_name = repo, folder, name
            entry.generation = generation
            entry.size_bytes = size
            entry.loads += 1
            entry.loaded_at = time.time()
            entry.touch()
            entry.load_seconds = time.monotonic() - started
            entry.archive_seconds = archive_seconds
            entry.error = None
            self._cond.notify_all()
        log.info("loaded %s as %s in %.1f s (%.1f MB)", entry.target, name, entry.load_seconds, size / 1e6)

    def _post_load(self, entry: ModelEntry, repo: Path):
        generation = entry.generation
        folder = self.cache.generation(repo, generation)
        name = triton_model_name(entry.target, generation)
        answer = self.triton.load(name, folder, timeout=self.limits.load_timeout_s)
        return answer, folder, name, generation

    def _failed(self, entry: ModelEntry, info: ArchiveInfo, error: EndpointError, started: float,
                *, remember: bool = True) -> None:
        with self._cond:
            entry.state = State.FAILED
            entry.error = error
            entry.failed_version = info.version
            entry.failed_at = time.monotonic()
            entry.remembered = remember
            entry.load_seconds = time.monotonic() - started
            self._cond.notify_all()
        log.warning("loading %s failed: %s", entry.target, error.message)

    def _make_room(self, entry: ModelEntry, size: int) -> None:
        deadline = time.monotonic() + self.limits.busy_wait_s
        while True:
            with self._cond:
                loaded = [e for e in self._entries.values() if e.state is State.LOADED and e is not entry]
                fits_count = self.limits.max_models is None or len(loaded) + 1 <= self.limits.max_models
                fits_bytes = self.limits.max_bytes is None or \
                    sum(e.size_bytes for e in loaded) + size <= self.limits.max_bytes
                if fits_count and fits_bytes:
                    return
                idle = sorted((e for e in loaded if e.in_flight == 0), key=lambda e: e.last_used_mono)
                if not idle:
                    if time.monotonic() > deadline:
                        raise ServiceUnavailable(
                            f"Every loaded model is busy, and {entry.target} needs room "
                            f"(at most {self.limits.max_models} models / "
                            f"{_gb(self.limits.max_bytes)} loaded). Try again shortly.")
                    self._cond.wait(1.0)  # a release() wakes us
                    continue
                victim = idle[0]
                victim.state = State.UNLOADING
            self._unload(victim, reason=f"making room for {entry.target}")

    def _evict_one(self, *, exclude: ModelEntry) -> bool:
        with self._cond:
            idle = sorted((e for e in self._entries.values()
                           if e.state is State.LOADED and e.in_flight == 0 and e is not exclude),
                          key=lambda e: e.last_used_mono)
            if not idle:
                return False
            victim = idle[0]
            victim.state = State.UNLOADING
        self._unload(victim, reason=f"out of memory loading {exclude.target}")
        return True

    def _unload(self, victim: ModelEntry, *, reason: str) -> None:
        started = time.monotonic()
        clean = False
        try:
            if victim.folder is not None and not self.triton.stub_pids(victim.folder):
                # Its stub died unnoticed: the SageMaker DELETE would hang (see triton.py).
                self.triton.unload_core(victim.triton_name)
                victim.crashes += 1
                answer = None
            else:
                answer = self.triton.unload(victim.triton_name, timeout=self.limits.unload_timeout_s)
                clean = answer.status == 200
            if answer is not None and not clean:
                log.warning("unloading %s answered %s: %s", victim.target, answer.status, answer.text[:200])
        except TritonUnreachable as error:
            log.warning("unloading %s failed: %s", victim.target, error)
        with self._cond:
            victim.state = State.ABSENT
            victim.evictions += 1
            victim.loaded_at = None
            if not clean:
                victim.generation += 1  # its name may still be registered: reload under a new one
            self._cond.notify_all()
        log.info("evicted %s (%s) in %.1f s", victim.target, reason, time.monotonic() - started)

    def _unload_crashed(self, name: str) -> None:
        # Through the core API: the SageMaker DELETE of a dead model hangs 350 s (see triton.py).
        try:
            answer = self.triton.unload_core(name)
            if answer.status != 200:
                log.warning("unloading crashed %s answered %s: %s", name, answer.status, answer.text[:200])
        except TritonUnreachable as error:
            log.warning("unloading crashed %s failed: %s", name, error)

    # -- listing ------------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            entries = sorted(self._entries.values(), key=lambda e: -(e.last_used_mono or 0))
            return [e.describe() for e in entries]

    def entry(self, target: str) -> ModelEntry | None:
        with self._cond:
            return self._entries.get(target)

    def usage(self) -> dict[str, Any]:
        with self._cond:
            loaded = [e for e in self._entries.values() if e.state is State.LOADED]
            return {"loaded_models": len(loaded), "loaded_bytes": sum(e.size_bytes for e in loaded),
                    "max_models": self.limits.max_models, "max_bytes": self.limits.max_bytes,
                    "max_gb": None if self.limits.max_bytes is None else self.limits.max_bytes / 2**30}


def _gb(value: int | None) -> str:
    return "no size limit" if value is None else f"{value / 2**30:.3f} GB"


def _json_error(text: str) -> str:
    import json

    return json.dumps({"error": text})
