"""Fair sharing of one endpoint between every designer of the studio.

The endpoint serves a batch of calls per model at a time (Triton's max_batch_size), so the
studio keeps that many calls in flight, for all designers together, and decides whose call goes
next: sessions take turns, call by call, each with at most `calls_per_session` calls in flight
(default 1). A job (one click: one image, four images, nine tiles) belongs to a session; a
session has one job running, the next ones wait their turn, and a job that waits is told its
place; a session may have at most `jobs_per_session` jobs waiting or running (a designer's
quota, studio.quotas.JOBS_AT_ONCE), so no one designer fills the studio's `max_jobs`. Triton
batches the calls of different designers that are in flight together; a GPU
runs one batch at a time, so a designer's one-image job waits for at most one call of another
designer's nine-tile upscale, never for all nine batched together.

A job may submit its calls at once, even while it waits its turn: they stay queued until the
session's earlier jobs are over. Cancelling a job takes its calls that are not sent yet off the
queue at once; a call already sent still occupies its place until the endpoint answers (the
serving side stops any call at the invocation limit), so capacity is only ever freed by calls
that really ended. Nothing here looks at a clock: every wait is on the scheduler's condition,
notified by whatever changes what the waiter waits for.

No Gradio here: app.py hands each job the session's id and shows what the job reports.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from studio.errors import StudioBusy, StudioError
from studio.quotas import JOBS_AT_ONCE
from studio.runner import CancelSignal

# Jobs at once (running or waiting), all sessions together, before the studio says it is busy.
DEFAULT_MAX_JOBS = 64


@dataclass(eq=False)
class Job:
    """One designer's job: its calls go through the scheduler, in its session's turn."""

    scheduler: FairScheduler
    session: str
    number: int
    started: threading.Event = field(default_factory=threading.Event)
    cancelled: CancelSignal = field(default_factory=CancelSignal)
    pending: deque = field(default_factory=deque)  # (future, fn) not sent yet
    running: int = 0  # calls sent and not yet answered

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Queue one endpoint call of this job (sent in the job's turn); its Future resolves when
        the endpoint answers."""
        return self.scheduler._submit(self, fn)

    def cancel(self) -> None:
        """Drop the calls not sent yet (their Futures are cancelled); sent ones finish."""
        self.scheduler._cancel(self)

    def waiting_line(self) -> str | None:
        """What the designer should read while this job waits, or None once it runs."""
        if not self.started.is_set():
            ahead = self.scheduler.jobs_ahead(self)
            return f"Queued behind {ahead} earlier job{'s' if ahead != 1 else ''} of yours…"
        if self.pending and not self.running:
            ahead = self.scheduler.sessions_ahead(self)
            busy = self.scheduler.stats()["in_flight"]
            return (f"Waiting for the endpoint: {busy} call{'s' if busy != 1 else ''} of other designers "
                    f"running, {ahead} designer{'s' if ahead != 1 else ''} ahead of you…")
        return None

    def wait_for_turn(self, on_wait: Callable[[int], None] | None = None, poll_s: float = 1.0) -> None:
        """Block until this job's turn comes (the session's earlier jobs are over), or raise
        StudioError once it is cancelled: either wakes it at once. The studio itself never waits
        so (a job's calls queue until its turn); this is for a caller that wants to.

        `on_wait(jobs ahead)`, when given, is told the job's place at least every `poll_s` while
        it waits: a report for a person watching, not how the wait notices anything.
        """
        self.scheduler._wait_for_turn(self, on_wait, poll_s)

    def end(self) -> None:
        """The job is over (done, failed, cancelled or refused): the session's next job may start."""
        self.scheduler._finish(self)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()


class FairScheduler:
    """At most `capacity` calls in flight, `calls_per_session` of them per session; sessions
    served in turn, one job each at a time; at most `max_jobs` jobs waiting or running, and
    `jobs_per_session` of them per session."""

    def __init__(self, capacity: int, max_jobs: int = DEFAULT_MAX_JOBS, calls_per_session: int = 1,
                 jobs_per_session: int = JOBS_AT_ONCE):
        if capacity < 1 or calls_per_session < 1 or jobs_per_session < 1:
            raise ValueError("capacity, calls_per_session and jobs_per_session must be at least 1")
        self.capacity = capacity
        self.max_jobs = max_jobs
        self.calls_per_session = calls_per_session
        self.jobs_per_session = jobs_per_session
        self._lock = threading.Condition()  # its waiters: the workers, for a call to send
        self._jobs_changed = threading.Condition(self._lock)  # a job started or was cancelled
        self._numbers = itertools.count(1)
        # Per session, its jobs in order: the first is the running one, the rest wait.
        self._jobs: OrderedDict[str, deque[Job]] = OrderedDict()
        self._in_flight = 0
        self._turn: deque[str] = deque()  # sessions in the order they get the next free slot
        self._workers = [
            threading.Thread(target=self._work, name=f"endpoint-call-{index}", daemon=True)
            for index in range(capacity)
        ]
        for worker in self._workers:
            worker.start()

    # --- jobs ---------------------------------------------------------------------------------

    def job(self, session: str) -> Job:
        """A new job of `session`: it starts when the session's earlier jobs are done. A StudioError
        when the session has its `jobs_per_session` already; StudioBusy when the studio is full."""
        with self._lock:
            own = len(self._jobs.get(session, ()))
            if own >= self.jobs_per_session:
                jobs = f"{own} job{'s' if own != 1 else ''}"
                raise StudioError(f"You have {jobs} waiting or running, the most a designer may at once; send "
                                  f"this one when one of them is over (or cancel one). Nothing was sent.")
            jobs_now = sum(len(jobs) for jobs in self._jobs.values())
            if jobs_now >= self.max_jobs:
                raise StudioBusy(
                    f"The studio is busy: {jobs_now} jobs are running or waiting for the endpoint, its "
                    f"limit. Try again in a minute; nothing was sent."
                )
            job = Job(self, session, next(self._numbers))
            jobs = self._jobs.setdefault(session, deque())
            jobs.append(job)
            if len(jobs) == 1:
                job.started.set()
            return job

    def jobs_ahead(self, job: Job) -> int:
        """How many of the session's own jobs come before `job`."""
        with self._lock:
            jobs = self._jobs.get(job.session, deque())
            return next((index for index, other in enumerate(jobs) if other is job), 0)

    def sessions_ahead(self, job: Job) -> int:
        """Sessions whose next call goes before `job`'s next one (each sends one, then it is its turn)."""
        with self._lock:
            return list(self._turn).index(job.session) if job.session in self._turn else 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "in_flight": self._in_flight,
                "queued_calls": sum(len(job.pending) for jobs in self._jobs.values() for job in jobs),
                "jobs": sum(len(jobs) for jobs in self._jobs.values()),
            }

    # --- what Job calls ------------------------------------------------------------------------

    def _wait_for_turn(self, job: Job, on_wait: Callable[[int], None] | None, poll_s: float) -> None:
        while True:
            with self._lock:
                if job.started.is_set():
                    return
                if job.cancelled.is_set():
                    raise StudioError("Cancelled before it started.")
            if on_wait is not None:
                on_wait(self.jobs_ahead(job))
            with self._lock:
                if not (job.started.is_set() or job.cancelled.is_set()):
                    # _finish and _cancel notify: a start or a cancel ends this wait at once.
                    self._jobs_changed.wait(poll_s if on_wait is not None else None)

    def _submit(self, job: Job, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._lock:
            if job.cancelled.is_set():
                future.cancel()
                return future
            job.pending.append((future, fn))
            if job.session not in self._turn:
                self._turn.append(job.session)
            self._lock.notify()
        return future

    def _cancel(self, job: Job) -> None:
        with self._lock:
            job.cancelled.set()
            while job.pending:
                future, _ = job.pending.popleft()
                future.cancel()
            self._lock.notify_all()
            self._jobs_changed.notify_all()

    def _finish(self, job: Job) -> None:
        """The job is over (done, failed or cancelled): the session's next job may start."""
        self._cancel(job)
        with self._lock:
            jobs = self._jobs.get(job.session)
            if jobs is not None and job in jobs:
                jobs.remove(job)
                if jobs:
                    jobs[0].started.set()
                    # Its calls were queued while it waited: the session takes its turns again.
                    if jobs[0].pending and job.session not in self._turn:
                        self._turn.append(job.session)
                else:
                    del self._jobs[job.session]
            self._lock.notify_all()
            self._jobs_changed.notify_all()

    # --- the workers ---------------------------------------------------------------------------

    def _next_call(self) -> tuple[Job, Future, Callable[[], Any]]:
        """The next call (blocking): from the session with the fewest calls in flight (below its
        share), the first in line among equals; that session then goes to the back of the line."""
        with self._lock:
            while True:
                ready = []
                for position, session in enumerate(self._turn):
                    jobs = self._jobs.get(session)
                    # Only a session's first job is running, and it has its share in flight at most.
                    if jobs and jobs[0].pending and jobs[0].running < self.calls_per_session:
                        ready.append((jobs[0].running, position, jobs[0]))
                if ready:
                    _, _, job = min(ready, key=lambda entry: entry[:2])
                    self._turn.remove(job.session)
                    future, fn = job.pending.popleft()
                    if job.pending:
                        self._turn.append(job.session)
                    if not future.set_running_or_notify_cancel():
                        continue
                    job.running += 1
                    self._in_flight += 1
                    return job, future, fn
                self._lock.wait()

    def _work(self) -> None:
        while True:
            job, future, fn = self._next_call()
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)
            finally:
                with self._lock:
                    job.running -= 1
                    self._in_flight -= 1
                    self._lock.notify_all()
