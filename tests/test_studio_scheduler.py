"""studio.scheduler: the endpoint shared fairly between sessions, with calls that block on events
(no endpoint, no clock: the order of calls is what is checked)."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from studio.client import StudioError
from studio.scheduler import FairScheduler, StudioBusy

WAIT_S = 10  # bounds every wait; none is reached when the code is right


class Gate:
    """Calls that record their start and block until released."""

    def __init__(self):
        self.started: list[str] = []
        self.release = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def call(self, name: str):
        event = self.release.setdefault(name, threading.Event())

        def run():
            with self.changed:
                self.started.append(name)
                self.changed.notify_all()
            assert event.wait(WAIT_S), f"{name} was never released"
            return name

        return run

    def wait_started(self, count: int) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.started) >= count, WAIT_S), self.started
            return list(self.started)

    def open(self, name: str):
        self.release.setdefault(name, threading.Event()).set()


def test_capacity_bounds_the_calls_in_flight():
    scheduler, gate = FairScheduler(capacity=2, calls_per_session=4), Gate()
    job = scheduler.job("a")
    futures = [job.submit(gate.call(f"a{k}")) for k in range(4)]
    assert gate.wait_started(2) == ["a0", "a1"]
    assert scheduler.stats() == {"in_flight": 2, "queued_calls": 2, "jobs": 1}
    gate.open("a0")
    assert gate.wait_started(3) == ["a0", "a1", "a2"]
    for name in ("a1", "a2", "a3"):
        gate.open(name)
    assert [future.result(WAIT_S) for future in futures] == ["a0", "a1", "a2", "a3"]


def test_a_session_has_its_share_of_calls_in_flight_and_no_more():
    scheduler, gate = FairScheduler(capacity=4), Gate()  # one call per session by default
    big, small = scheduler.job("big"), scheduler.job("small")
    tiles = [big.submit(gate.call(f"tile{k}")) for k in range(9)]
    assert gate.wait_started(1) == ["tile0"]
    assert scheduler.stats()["in_flight"] == 1  # room for others: they do not wait behind the tiles
    image = small.submit(gate.call("small"))
    assert gate.wait_started(2) == ["tile0", "small"]
    gate.open("tile0")
    assert gate.wait_started(3)[2] == "tile1"
    gate.open("small")
    assert image.result(WAIT_S) == "small"
    for k in range(1, 9):
        gate.open(f"tile{k}")
    assert [tile.result(WAIT_S) for tile in tiles] == [f"tile{k}" for k in range(9)]


def test_with_a_larger_share_a_small_job_still_goes_before_the_big_jobs_next_call():
    scheduler, gate = FairScheduler(capacity=2, calls_per_session=8), Gate()
    big, small = scheduler.job("big"), scheduler.job("small")
    tiles = [big.submit(gate.call(f"tile{k}")) for k in range(9)]
    gate.wait_started(2)  # the big job fills the endpoint while nobody else waits
    image = small.submit(gate.call("small"))
    gate.open("tile0")  # the first call to end frees the slot for the session with fewer in flight
    assert gate.wait_started(3)[2] == "small"
    gate.open("small")
    assert image.result(WAIT_S) == "small"
    for k in range(1, 9):
        gate.open(f"tile{k}")
    assert [tile.result(WAIT_S) for tile in tiles] == [f"tile{k}" for k in range(9)]


def test_sessions_take_turns_call_by_call():
    scheduler, gate = FairScheduler(capacity=1), Gate()
    blocker = scheduler.job("z").submit(gate.call("z"))
    gate.wait_started(1)
    jobs = {name: scheduler.job(name) for name in "abc"}
    for name, job in jobs.items():
        for k in range(2):
            job.submit(gate.call(f"{name}{k}"))
    gate.open("z")
    blocker.result(WAIT_S)
    order = []
    for count in range(2, 8):
        order = gate.wait_started(count)
        gate.open(order[-1])
    assert order[1:] == ["a0", "b0", "c0", "a1", "b1", "c1"]


def test_a_session_runs_one_job_at_a_time_and_the_next_is_told_its_place():
    scheduler, gate = FairScheduler(capacity=4), Gate()
    first, second = scheduler.job("a"), scheduler.job("a")
    assert first.started.is_set() and not second.started.is_set()
    assert scheduler.jobs_ahead(second) == 1
    places, told = [], threading.Event()

    def on_wait(place: int) -> None:
        places.append(place)
        told.set()

    waiter = threading.Thread(target=second.wait_for_turn, kwargs={"on_wait": on_wait, "poll_s": 0.01})
    waiter.start()
    first.submit(gate.call("first"))
    gate.wait_started(1)
    gate.open("first")
    assert told.wait(WAIT_S), "the waiting job was never told its place"
    with first:
        pass  # the job ends: the session's next one starts
    waiter.join(WAIT_S)
    assert not waiter.is_alive() and second.started.is_set()
    assert places and set(places) == {1}


def test_cancel_drops_unsent_calls_and_frees_capacity_only_when_sent_ones_end():
    scheduler, gate = FairScheduler(capacity=1), Gate()
    job = scheduler.job("a")
    sent, unsent = job.submit(gate.call("sent")), job.submit(gate.call("unsent"))
    gate.wait_started(1)
    job.cancel()
    assert unsent.cancelled() and job.submit(gate.call("later")).cancelled()
    assert scheduler.stats()["in_flight"] == 1  # the sent call still holds its place
    other = scheduler.job("b").submit(gate.call("other"))
    gate.open("sent")
    assert sent.result(WAIT_S) == "sent"
    assert gate.wait_started(2) == ["sent", "other"]
    gate.open("other")
    assert other.result(WAIT_S) == "other"
    with pytest.raises(CancelledError):
        unsent.result(0)


def test_a_waiting_job_that_is_cancelled_never_starts():
    scheduler = FairScheduler(capacity=1)
    scheduler.job("a")
    waiting = scheduler.job("a")
    waiting.cancel()
    with pytest.raises(StudioError, match="Cancelled"):
        waiting.wait_for_turn(poll_s=0.01)


def test_a_full_studio_says_so_and_takes_jobs_again_when_one_ends():
    scheduler = FairScheduler(capacity=1, max_jobs=2)
    first, _ = scheduler.job("a"), scheduler.job("b")
    with pytest.raises(StudioBusy, match="studio is busy.*nothing was sent"):
        scheduler.job("c")
    with first:
        pass
    assert scheduler.job("c").started.is_set()


def test_one_designer_cannot_fill_the_studios_queue():
    """10 jobs of one designer at once: the first few are queued, the rest refused before they are,
    with why; another designer still gets in, and an ended job makes room for the next."""
    scheduler = FairScheduler(capacity=1, max_jobs=64, jobs_per_session=3)
    accepted, refused = [], []
    for _ in range(10):
        try:
            accepted.append(scheduler.job("alice"))
        except StudioError as error:
            refused.append(str(error))
    assert len(accepted) == 3 and len(refused) == 7
    assert refused[0] == ("You have 3 jobs waiting or running, the most a designer may at once; send this one "
                          "when one of them is over (or cancel one). Nothing was sent.")
    assert scheduler.stats()["jobs"] == 3
    assert scheduler.job("bob").started.is_set()
    accepted[0].end()
    assert accepted[1].started.is_set()
    scheduler.job("alice")  # room again
    with pytest.raises(StudioError, match="3 jobs waiting or running"):
        scheduler.job("alice")
    with pytest.raises(ValueError, match="jobs_per_session"):
        FairScheduler(capacity=1, jobs_per_session=0)


def test_the_studios_limit_still_holds_for_all_designers_together():
    scheduler = FairScheduler(capacity=1, max_jobs=4, jobs_per_session=3)
    for designer in ("a", "a", "b", "c"):
        scheduler.job(designer)
    with pytest.raises(StudioBusy, match="studio is busy: 4 jobs"):
        scheduler.job("d")


def test_a_failing_call_fails_its_future_and_the_worker_goes_on():
    scheduler = FairScheduler(capacity=1)
    job = scheduler.job("a")

    def fail():
        raise StudioError("the model refused it")

    failed, ok = job.submit(fail), job.submit(lambda: 42)
    with pytest.raises(StudioError, match="refused"):
        failed.result(WAIT_S)
    assert ok.result(WAIT_S) == 42
