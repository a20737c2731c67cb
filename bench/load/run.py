"""One run: designers for a while, with or without a fault a third of the way in; its figures
(requests, latency per tab, throughput, memory of each process of the studio's tree) and, after a
fault, how long until every tab answered again and whether the history survived."""

from __future__ import annotations

import hashlib
import math
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

from bench.load.designers import JOB_WAIT_S, MODEL_TABS, RECOVERY_LIMIT_S, RESTORE, Designer, Result, Step
from bench.load.faults import inject
from bench.load.hostile import DEFAULT_RATE_PER_KIND, Strangers
from bench.load.studio_tree import Studio

MEMORY_SAMPLE_S = 2.0
MEMORY_GROWTH_LIMIT = 1.10  # last third's median RSS over the first third's, per process


@dataclass
class Run:
    name: str
    seconds: float
    steps: list[Step]
    memory: dict[str, list[tuple[float, int, int]]]  # role -> (when, pid, RSS bytes)
    fault: dict = field(default_factory=dict)

    def figures(self) -> dict:
        tabs = {}
        for tab in (*MODEL_TABS, RESTORE):
            times = sorted(s.seconds for s in self.steps if s.tab == tab and s.ok)
            if any(s.tab == tab for s in self.steps):
                tabs[tab] = {"done": len(times), "p50_s": percentile(times, 0.50), "p95_s": percentile(times, 0.95)}
        jobs = [s for s in self.steps if s.tab in MODEL_TABS and s.ok]
        memory = {}
        for role, samples in self.memory.items():
            third = max(1, len(samples) // 3)
            first = statistics.median(rss for _, _, rss in samples[:third])
            last = statistics.median(rss for _, _, rss in samples[-third:])
            # A process a fault replaced starts small again: its row is shown, not judged.
            memory[role] = {"first_mb": first / 2**20, "last_mb": last / 2**20, "ratio": last / first,
                            "samples": len(samples), "restarted": len({pid for _, pid, _ in samples}) > 1}
        return {
            "name": self.name, "seconds": self.seconds, "sent": len(self.steps),
            "completed": sum(s.ok for s in self.steps), "failed": sum(s.error is not None for s in self.steps),
            "lost": sum(s.lost for s in self.steps), "tabs": tabs,
            "jobs_per_minute": len(jobs) / (self.seconds / 60) if self.seconds else 0.0,
            "messages": sorted({s.error for s in self.steps if s.error}), "memory": memory,
            "memory_grew": any(m["ratio"] > MEMORY_GROWTH_LIMIT for m in memory.values() if not m["restarted"]),
            **self.fault,
        }


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when there are none)."""
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None


def sample_memory(studio: Studio, memory: dict, stop: threading.Event) -> None:
    while True:
        now = time.monotonic()
        for role, process in studio.processes().items():
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            # Zero: it exited (a zombie) since the tree was listed; nothing left to judge.
            if rss:
                memory.setdefault(role, []).append((now, process.pid, rss))
        if stop.wait(MEMORY_SAMPLE_S):
            return


def run_load(studio: Studio, *, designers: int, seconds: float, fault: str | None = None,
             tabs: tuple[str, ...] = MODEL_TABS, hostile: bool = False,
             hostile_rate: float = DEFAULT_RATE_PER_KIND) -> dict:
    """Designers for ``seconds`` (longer when a fault needs time to recover), with strangers
    flooding the studio beside them when ``hostile``; the run's figures."""
    steps: list[Step] = []
    lock, stop, sampler_stop = threading.Lock(), threading.Event(), threading.Event()
    memory: dict[str, list[tuple[float, int, int]]] = {}
    sampler = threading.Thread(target=sample_memory, args=(studio, memory, sampler_stop), daemon=True)
    sampler.start()
    crew = [Designer(i, studio, steps, lock, stop, tabs) for i in range(designers)]
    started = time.monotonic()
    for designer in crew:
        designer.thread.start()
    strangers = Strangers(studio.url, tuple(studio.accounts), rate_per_kind=hostile_rate).start() if hostile else None
    report: dict = {}
    try:
        if fault is not None:
            # A third of the way in, once every designer has a result whose history can be checked.
            stop.wait(seconds / 3)
            while not all(d.generated for d in crew) and time.monotonic() - started < RECOVERY_LIMIT_S:
                stop.wait(0.5)
            before = {d.index: list(d.generated) for d in crew}
            report = inject(fault, studio)
            report["recovery_s"] = recovered_after(steps, lock, report["at"], tabs)
            report["history"] = history_check(studio, crew, before)
        stop.wait(max(0.0, started + seconds - time.monotonic()))
    finally:
        stop.set()
        if strangers is not None:
            strangers.stop()
            report["strangers"] = strangers.figures()
        for designer in crew:
            designer.thread.join(JOB_WAIT_S + 10)
        sampler_stop.set()
        sampler.join()
    if fault is not None:
        report["at_s"] = report.pop("at") - started
    elapsed = time.monotonic() - started
    name = fault or ("load with strangers" if hostile else "load")
    return Run(name, elapsed, steps, memory, report).figures()


def warm_up(studio: Studio, tabs: tuple[str, ...] = MODEL_TABS) -> list[Step]:
    """One designer's chain, so that every model is loaded before the clock starts; its steps."""
    steps: list[Step] = []
    Designer(0, studio, steps, threading.Lock(), threading.Event(), tabs).chain()
    return steps


def recovered_after(steps: list[Step], lock: threading.Lock, since: float, tabs: tuple[str, ...]) -> float | None:
    """Seconds from ``since`` until a job sent after it had answered on every tab (None: not
    within RECOVERY_LIMIT_S)."""
    while time.monotonic() - since < RECOVERY_LIMIT_S:
        with lock:
            firsts = [min((s.ended for s in steps if s.tab == tab and s.started >= since and s.ok), default=None)
                      for tab in tabs]
        if all(first is not None for first in firsts):
            return max(firsts) - since
        time.sleep(0.5)
    return None


def history_check(studio: Studio, crew: list[Designer], before: dict[int, list[Result]]) -> dict:
    """The results the designers had before the fault: still served, unchanged, and restorable."""
    served = changed = 0
    problems = []
    for designer in crew:
        for result in before[designer.index]:
            try:
                data = studio.read(result.url, designer.client.cookies if designer.client else designer.cookies)
                same = hashlib.sha256(data).hexdigest() == result.digest
            except (OSError, httpx.HTTPError) as error:
                problems.append(f"designer {designer.index}: {result.url} is gone ({error})")
                continue
            served += same
            changed += not same
        if before[designer.index]:
            first = before[designer.index][0]
            if designer.restore(first) is None:
                problems.append(f"designer {designer.index}: its first result did not restore")
    if changed:
        problems.append(f"{changed} results changed")
    return {"results_served": served, "designers": sum(bool(v) for v in before.values()), "problems": problems,
            "intact": not problems}
