"""How much of the endpoint each designer, and the studio as a whole, may take.

Counted per designer (the signed-in name, else the browser session):

* jobs at once, waiting or running: checked by the scheduler (studio.scheduler.FairScheduler.job)
  before a job is queued, so that one designer cannot fill the studio's queue;
* jobs per minute;
* work per day, in the unit studio.planning defines (JobPlan.work: endpoint calls x the steps
  each runs x its output megapixels), so that a 1024 px upscale of 4 images (100 calls) costs
  what it makes the endpoint do, not "4 images";

and for all designers together a daily budget of work (besides the scheduler's jobs at once for
the whole studio). A day is the last 24 hours. A job over any of them is refused before anything
is sent, with what it costs, what is left and when the designer may go on; `QuotaBook.done_line`
tells the designer what is left after each job. Every number is a flag with an environment
variable (QUOTA_SETTINGS), how `python -m studio`, a container and a Space set them.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from studio.errors import StudioError
from studio.planning import WORK_UNIT, WORK_UNIT_MEANING, describe_work

DAY_S, MINUTE_S = 86_400, 60

# The defaults. One unit of work is a step over a megapixel: a 512×512 Generate at 50 steps is 13
# units; an A10G (the default instance) runs roughly 2 units a second for SD 2 at 512 px, about
# 8 steps a second.
#
# A designer's jobs waiting or running at once: the scheduler runs one job per designer at a time
# (the rest wait their turn), so one running and two lined up keep a designer busy; the studio's
# 64 (studio.scheduler.DEFAULT_MAX_JOBS) then hold at least 21 designers.
JOBS_AT_ONCE = 3
# Jobs a designer may send a minute: a person clicking fast, not a script.
JOBS_PER_MINUTE = 10
# A designer's work a day: about 760 Generate images at 512 px and 50 steps, or 7 upscales of a
# 1024 px image; about 1.4 hours of an A10G (~$2 on demand), a day's work for one person.
WORK_PER_DAY = 10_000
# All designers together a day: ten designers' full days; about 14 hours of one A10G (~$21 on an
# ml.g5.2xlarge on demand), so a crowd of new accounts cannot run up more than that.
DAILY_BUDGET = 100_000
# Every job is charged at least this much: each call has a cost of its own whatever its size
# (encoding the prompt, the VAE, the network), and the book's entries for a day stay bounded by
# the daily budget.
MIN_JOB_WORK = 1.0


@dataclass(frozen=True)
class Setting:
    """One quota as a flag and an environment variable."""

    name: str  # the Quotas field
    flag: str
    env: str
    help: str


QUOTA_SETTINGS = (
    Setting("jobs_at_once", "--jobs-at-once", "STUDIO_JOBS_AT_ONCE", "jobs a designer may have waiting or running"),
    Setting("jobs_per_minute", "--jobs-per-minute", "STUDIO_JOBS_PER_MINUTE", "jobs a designer may send a minute"),
    Setting("work_per_day", "--work-per-day", "STUDIO_WORK_PER_DAY",
            f"{WORK_UNIT} a designer may use a day ({WORK_UNIT_MEANING})"),
    Setting("daily_budget", "--daily-budget", "STUDIO_DAILY_BUDGET",
            f"{WORK_UNIT} all designers together may use a day"),
)
# Read by earlier versions; now a clear start-up error rather than a setting silently ignored.
RETIRED_ENV = {"STUDIO_IMAGES_PER_DAY": "STUDIO_WORK_PER_DAY (quotas count work, not images)"}


@dataclass(frozen=True)
class Quotas:
    jobs_at_once: int = JOBS_AT_ONCE
    jobs_per_minute: int = JOBS_PER_MINUTE
    work_per_day: float = WORK_PER_DAY
    daily_budget: float = DAILY_BUDGET

    def __post_init__(self) -> None:
        for setting in QUOTA_SETTINGS:
            value = getattr(self, setting.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1):
                raise ValueError(f"{setting.flag} ({setting.env}): at least 1; got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Quotas:
        """The quotas the environment sets (QUOTA_SETTINGS), the defaults for the rest; a
        ValueError names a variable that is not a whole number of at least 1, or one retired."""
        env = os.environ if environ is None else environ
        for name, instead in RETIRED_ENV.items():
            if name in env:
                raise ValueError(f"{name} is no longer read; set {instead}")
        values = {}
        for setting in QUOTA_SETTINGS:
            if env.get(setting.env):
                try:
                    values[setting.name] = int(env[setting.env])
                except ValueError:
                    raise ValueError(f"{setting.env}: a whole number; got {env[setting.env]!r}") from None
        return cls(**values)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One flag per quota, with these quotas (`from_env`'s) as the defaults."""
        for setting in QUOTA_SETTINGS:
            default = getattr(self, setting.name)
            parser.add_argument(setting.flag, type=int, default=default,
                                help=f"{setting.help} (default {default:,}; {setting.env})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Quotas:
        return cls(**{setting.name: getattr(args, setting.name) for setting in QUOTA_SETTINGS})


@dataclass
class QuotaBook:
    """What each designer, and the studio, has sent lately; `charge` refuses a job over a quota
    before it is sent. Time comes from `clock` (seconds; tests give their own)."""

    quotas: Quotas
    clock: Callable[[], float] = time.monotonic
    # Each designer's entries, and everyone's in the order they came (what `_forget` walks).
    _jobs: dict[str, deque[float]] = field(default_factory=dict)  # designer -> times of the last minute's jobs
    _work: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)  # designer -> (time, work) today
    _minute: deque[tuple[float, str]] = field(default_factory=deque)  # (time, designer) of the last minute
    _studio: deque[tuple[float, float, str]] = field(default_factory=deque)  # (time, work, designer) today
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def charge(self, designer: str, work: float) -> float:
        """Count a job of `work` (JobPlan.work) for `designer`, or raise StudioError saying which
        quota it is over, what it costs, what is left and when to go on; the work charged."""
        work = job_cost(work)
        now = self.clock()
        with self._lock:
            self._forget(now)
            jobs = self._jobs.get(designer, deque())
            if len(jobs) >= self.quotas.jobs_per_minute:
                raise StudioError(f"You have sent {len(jobs)} jobs in the last minute, the most a designer "
                                  f"may; go on in {_duration(jobs[0] + MINUTE_S - now)}.")
            done = self._work.get(designer, deque())
            self._refuse_over(work, [(when, amount) for when, amount in done], self.quotas.work_per_day, now,
                              "you have", "a designer may use")
            self._refuse_over(work, [(when, amount) for when, amount, _ in self._studio], self.quotas.daily_budget,
                              now, "the studio has", "all designers together may use")
            self._jobs.setdefault(designer, deque()).append(now)
            self._work.setdefault(designer, deque()).append((now, work))
            self._minute.append((now, designer))
            self._studio.append((now, work, designer))
        return work

    def left(self, designer: str) -> tuple[float, float]:
        """(the designer's work left today, the studio's), in WORK_UNIT."""
        with self._lock:
            self._forget(self.clock())
            used = sum(amount for _, amount in self._work.get(designer, ()))
            studio_used = sum(amount for _, amount, _ in self._studio)
        return max(0.0, self.quotas.work_per_day - used), max(0.0, self.quotas.daily_budget - studio_used)

    def done_line(self, designer: str, work: float) -> str:
        """For the designer after a job of `work` (JobPlan.work): what it cost and what is left
        ("It was 13 units of work; you have 9,987 left of the 10,000 a designer may use in a
        day."), and the studio's, when that is less."""
        mine, studio = self.left(designer)
        line = (f"It was {describe_work(job_cost(work))}; you have {describe_work(mine)} left of the "
                f"{self.quotas.work_per_day:,.0f} a designer may use in a day.")
        if studio < mine:
            line += f" The studio has {describe_work(studio)} left for all designers."
        return line

    def _refuse_over(self, work: float, entries: list[tuple[float, float]], limit: float, now: float,
                     whose: str, who_may: str) -> None:
        used = sum(amount for _, amount in entries)
        if used + work <= limit:
            return
        left = max(0.0, limit - used)
        cost = (f"This job is {describe_work(work)} ({WORK_UNIT_MEANING}); {whose} {describe_work(left)} left of "
                f"the {limit:,.0f} {who_may} in a day. Nothing was sent.")
        if work > limit:
            raise StudioError(f"{cost} Fewer steps, images or pixels make it smaller.")
        freed, wait = used + work - limit, 0.0
        for when, amount in entries:  # oldest first: what each expiry frees
            freed -= amount
            wait = when + DAY_S - now
            if freed <= 0:
                break
        raise StudioError(f"{cost} Enough is free again in {_duration(wait)}; a smaller job may fit sooner.")

    def _forget(self, now: float) -> None:
        """Drop what is older than a minute (jobs) or a day (work), and designers with nothing left:
        the book holds only the last day's entries, however many designers came and went."""
        while self._minute and self._minute[0][0] <= now - MINUTE_S:
            _, designer = self._minute.popleft()
            jobs = self._jobs.get(designer)
            while jobs and jobs[0] <= now - MINUTE_S:
                jobs.popleft()
            if jobs is not None and not jobs:
                del self._jobs[designer]
        while self._studio and self._studio[0][0] <= now - DAY_S:
            _, _, designer = self._studio.popleft()
            done = self._work.get(designer)
            while done and done[0][0] <= now - DAY_S:
                done.popleft()
            if done is not None and not done:
                del self._work[designer]


def job_cost(work: float) -> float:
    """What a job of `work` (JobPlan.work) is charged: its work, at least MIN_JOB_WORK."""
    return max(work, MIN_JOB_WORK)


def _duration(seconds: float) -> str:
    """A wait as a designer reads it: "40 s", "12 min", "5 h 12 min"."""
    seconds = max(1, math.ceil(seconds))
    if seconds < 2 * MINUTE_S:
        return f"{seconds} s"
    minutes = math.ceil(seconds / MINUTE_S)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
