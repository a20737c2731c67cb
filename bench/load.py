"""Designers under load, and faults under that load: the real studio in front of the real local
endpoint (real Triton, tiny weights, CPU), everything on 127.0.0.1.

Each simulated designer is its own gradio_client session on the studio's named API, chaining
generate -> erase (with a mask) -> restyle -> upscale -> restore (the generated PNG back to its
tab's values), again and again until the time is up. Printed: failed requests, p50/p95 latency
per tab, throughput, and the resident memory of the studio, the endpoint, tritonserver and each
model's Python-backend stub, sampled through the run, with whether it grew.

A fault (--fault NAME, or --faults all for each in turn) is injected a third of the way into the
run; for each the script reports what the designers were told, that no accepted job was lost,
that the history is intact, and how long until every tab answered again without a manual step:

  kill-model         SIGKILL the stub of the Generate tab's model
  restart-triton     SIGTERM tritonserver (the endpoint's watchdog starts it again)
  restart-endpoint   SIGTERM the endpoint (graceful; the studio starts it again)
  kill-endpoint      SIGKILL the endpoint; its tritonserver and stubs must not outlive it
  kill-studio        SIGKILL the studio; its endpoint, tritonserver and stubs must not outlive
                     it; the script then starts the studio again, as a supervisor would
  fill-cache         load models the designers do not use until the endpoint must evict theirs
  unreadable-store   make the model store unreadable, crash the Generate model so that it must
                     be loaded from there, then make the store readable again

    python -m bench.load [--designers 4] [--seconds 60] [--fault NAME | --faults all]
                                 [--studio-url URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from serving.archive import REPO_ROOT, archive_name, build_model_archive
from bench.studio import designer_client, wait_until_up
from deploy.invoke import PROMPT
from serving.local_endpoint.__main__ import build_parser as endpoint_parser
from sdserve.catalog import MODELS, MODELS_BY_TASK
from serving.processes import exit_with_parent, find_free_port
from studio.client import StudioClient, StudioError

DEFAULT_DESIGNERS, MAX_DESIGNERS = 4, 16
DEFAULT_SECONDS, MAX_SECONDS = 60, 3600
SIZE, STEPS = 64, 2  # quick on a CPU with the tiny weights
MODEL_TABS = ("generate", "erase", "restyle", "upscale")  # a designer's chain, in order
RESTORE = "restore"
FAILURE_PAUSE_S = 2.0  # a designer told a job failed tries again after this
JOB_WAIT_S = 240  # a job without an answer by then counts as lost (the studio's own calls give up sooner)
RECOVERY_LIMIT_S = 300  # after a fault, every tab must answer again within this
ORPHAN_LIMIT_S = 60  # a killed parent's children must be gone by then (graceful stops included)
MEMORY_SAMPLE_S = 2.0
MEMORY_GROWTH_LIMIT = 1.10  # last third's median RSS over the first third's, per process
FILLER_MODELS = 2  # fill-cache: models loaded beside the designers', each evicting one of theirs
UNREADABLE_HOLD_S = 15  # unreadable-store: how long the store stays unreadable
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "load-studio"
STUB_MODEL = re.compile(r"/models/([^/]+?)-[0-9a-f]{16}/repo")  # the cache folder: the TargetModel's slug
FAULTS = ("kill-model", "restart-triton", "restart-endpoint", "kill-endpoint", "kill-studio", "fill-cache",
          "unreadable-store")


# --- the studio and its processes -----------------------------------------------------------------


def processes(studio_pid: int) -> dict[str, psutil.Process]:
    """The studio's live process tree by role: studio, endpoint, tritonserver, "stub <model>"."""
    found: dict[str, psutil.Process] = {}
    try:
        studio = psutil.Process(studio_pid)
    except psutil.Error:
        return found
    found["studio"] = studio
    for endpoint in _live_children(studio):
        if "serving.local_endpoint" in _cmdline(endpoint):
            found["endpoint"] = endpoint
            for triton in _live_children(endpoint):
                if Path(next(iter(_cmdline(triton)), "")).name == "tritonserver":
                    found["tritonserver"] = triton
                    for stub in _live_children(triton):
                        match = STUB_MODEL.search(" ".join(_cmdline(stub)))
                        found[f"stub {match.group(1).removesuffix('.tar.gz') if match else stub.pid}"] = stub
    return found


def _live_children(process: psutil.Process) -> list[psutil.Process]:
    # A killed stub stays a zombie until tritonserver reaps it: not one of the tree's processes.
    try:
        return [child for child in process.children() if alive(child)]
    except psutil.Error:
        return []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # ended while we looked: the next look sees the new tree
        return []


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(left: list[psutil.Process], limit_s: float = ORPHAN_LIMIT_S) -> tuple[float, list[str]]:
    """(seconds until none of ``left`` was alive, the ones still alive at the limit)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if not any(alive(p) for p in left):
            return time.monotonic() - started, []
        time.sleep(0.2)
    return time.monotonic() - started, [f"{p.name()} (pid {p.pid})" for p in left if alive(p)]


def listening_pid(port: int) -> int | None:
    """The process listening on a 127.0.0.1 port (an attached studio)."""
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            return connection.pid
    return None


@dataclass
class EndpointPlaces:
    """Where the studio's local endpoint serves and finds its models (from its command line)."""

    url: str
    model_store: Path


class Studio:
    """The studio under load: started here (and started again after kill-studio), or attached."""

    def __init__(self, work: Path, url: str | None = None):
        self.work = work
        self.process: subprocess.Popen | None = None
        self.port = urlparse(url).port if url else find_free_port()
        self.url = url or f"http://127.0.0.1:{self.port}/"
        self.pid = listening_pid(self.port) if url else None

    @property
    def started_here(self) -> bool:
        return self.process is not None

    def start(self) -> Studio:
        """`python -m studio` with its own local endpoint on this run's store, cache and results."""
        store = self.work / "store"
        if not store.is_dir():
            for model in MODELS:
                build_model_archive(model, REPO_ROOT / "serving" / "models", store)
        endpoint_args = ["--model-store", str(store), "--cache-dir", str(self.work / "cache"),
                         "--log-dir", str(self.work / "endpoint-logs"), "--no-build"]
        command = [sys.executable, "-m", "studio", "--port", str(self.port), "--results-dir",
                   str(self.work / "results"), "--jobs-per-minute", "100000", "--images-per-day", "10000000",
                   "--local-endpoint-args", shlex.join(endpoint_args)]
        if os.geteuid() == 0:
            # Root reads any file whatever its mode: without these two capabilities the studio and
            # everything it starts obey file permissions, as a service account does (unreadable-store).
            command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *command]
        with open(self.work / "studio.log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=exit_with_parent)
        self.pid = self.process.pid
        # It serves its page only once the endpoint it starts answers /ping.
        wait_until_up(self.url, self.process, timeout_s=600)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # it stops its endpoint on SIGTERM
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def processes(self) -> dict[str, psutil.Process]:
        return processes(self.pid) if self.pid else {}

    def endpoint(self) -> EndpointPlaces:
        endpoint = self.processes().get("endpoint")
        if endpoint is None:
            raise RuntimeError("the studio has no local endpoint of its own (it was given --endpoint-url or "
                               "--endpoint-name): this fault needs one")
        command = endpoint.cmdline()
        args = endpoint_parser().parse_args(command[command.index("serving.local_endpoint") + 1:])
        return EndpointPlaces(f"http://127.0.0.1:{args.port}", Path(args.model_store).resolve())


@contextmanager
def started_studio(work: Path) -> Iterator[Studio]:
    """A studio of its own (and its local endpoint) in ``work``, stopped at the end."""
    work.mkdir(parents=True, exist_ok=True)
    studio = Studio(work)
    try:
        yield studio.start()
    finally:
        studio.stop()


# --- the designers ------------------------------------------------------------------------------


@dataclass
class Step:
    designer: int
    tab: str
    started: float  # monotonic
    ended: float | None = None
    error: str | None = None  # what the designer was told
    lost: bool = False  # no answer at all within JOB_WAIT_S

    @property
    def ok(self) -> bool:
        return self.ended is not None and self.error is None and not self.lost

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass
class Result:
    """A result a designer keeps: where the studio serves it, its bytes' digest, its parameters."""

    url: str
    digest: str
    parameters: dict
    local: Path


class Designer:
    """One designer: a gradio_client session chaining the tabs until ``stop`` is set (a chain
    begun goes on to its end, so that every tab is measured however short the run)."""

    def __init__(self, index: int, studio: Studio, steps: list[Step], lock: threading.Lock,
                 stop: threading.Event, tabs: tuple[str, ...]):
        self.index, self.studio, self.steps, self.lock, self.stop = index, studio, steps, lock, stop
        self.tabs = tabs
        self.folder = studio.work / f"designer-{index}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.mask = self.folder / "mask.png"
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle((SIZE // 4, SIZE // 4, SIZE * 3 // 4, SIZE * 3 // 4), fill=255)
        mask.save(self.mask)
        self.client: Client | None = None
        self.generated: list[Result] = []  # the designer's history of generated images
        self.chains = 0
        self.thread = threading.Thread(target=self.run, name=f"designer {index}", daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.chain():
                self.stop.wait(FAILURE_PAUSE_S)  # as a person would, rather than resend at once

    def connect(self) -> Client | None:
        """The session, opened again after the studio went away (when it is back, within
        RECOVERY_LIMIT_S)."""
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while self.client is None and not self.stop.is_set() and time.monotonic() < deadline:
            try:
                # The designers' browsers are elsewhere in real use: files are fetched only when
                # the next step needs them, so the harness's own work stays small.
                self.client = designer_client(self.studio.url)
            except Exception:  # noqa: BLE001 - the studio is not back yet
                self.stop.wait(1.0)
        return self.client

    def chain(self) -> bool:
        """generate -> the other tabs -> restore; whether every step answered."""
        seed = 1000 * self.index + self.chains
        self.chains += 1
        values = {"prompt": PROMPT, "num_inference_steps": STEPS, "seed": seed}
        made = self.step("generate", width=SIZE, height=SIZE, **values)
        if made is None:
            return False
        self.generated.append(made)
        current = made
        for tab in self.tabs[1:]:
            inputs = {"image": handle_file(str(current.local))}
            if tab == "erase":
                inputs["mask"] = handle_file(str(self.mask))
            options = {"strength": 0.7} if tab == "restyle" else {}
            current = self.step(tab, **inputs, **values, **options)
            if current is None:
                return False
        return self.restore(made) is not None

    def _call(self, tab: str, api_name: str, **arguments) -> tuple[Step, object]:
        step = Step(self.index, tab, time.monotonic())
        with self.lock:
            self.steps.append(step)
        answer = None
        client = self.connect()
        if client is None:
            step.error, step.ended = "the studio was not back in time", time.monotonic()
            return step, None
        try:
            answer = client.submit(api_name=api_name, **arguments).result(timeout=JOB_WAIT_S)
        except TimeoutError:
            step.lost = True
        except AppError as error:  # the studio's own message for the designer
            step.error = str(error)
        except Exception as error:  # noqa: BLE001 - the studio itself went away: open a new session
            step.error = f"the studio did not answer ({type(error).__name__}: {error})"
            self.client = None
        step.ended = time.monotonic()
        return step, answer

    def step(self, tab: str, **arguments) -> Result | None:
        step, answer = self._call(tab, f"/{tab}", **arguments)
        if not step.ok:
            return None
        gallery, parameters = answer
        try:
            return self.fetch(gallery[0]["image"], parameters)
        except (OSError, KeyError, IndexError, TypeError) as error:
            step.error = f"its result could not be fetched ({error})"
            return None

    def fetch(self, image: dict | str, parameters: dict) -> Result:
        url = image["url"] if isinstance(image, dict) else image
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
        local = self.folder / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
        local.write_bytes(data)
        return Result(url, hashlib.sha256(data).hexdigest(), parameters, local)

    def restore(self, result: Result) -> dict | None:
        """The named API's restore: the generated PNG back to the Generate tab's values."""
        step, answer = self._call(RESTORE, f"/{RESTORE}", png=handle_file(str(result.local)))
        if not step.ok:
            return None
        task, values = answer
        if task != "generate" or values.get("seed") != result.parameters.get("seed") \
                or values.get("prompt") != result.parameters.get("prompt"):
            step.error = f"restore gave back {task} {values}, not the generated image's parameters"
            return None
        return values


# --- one run: designers for a while, with or without a fault ---------------------------------------


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
                memory.setdefault(role, []).append((now, process.pid, process.memory_info().rss))
            except psutil.Error:
                continue
        if stop.wait(MEMORY_SAMPLE_S):
            return


def run_load(studio: Studio, *, designers: int, seconds: float, fault: str | None = None,
             tabs: tuple[str, ...] = MODEL_TABS) -> dict:
    """Designers for ``seconds`` (longer when a fault needs time to recover); the run's figures."""
    steps: list[Step] = []
    lock, stop, sampler_stop = threading.Lock(), threading.Event(), threading.Event()
    memory: dict[str, list[tuple[float, int, int]]] = {}
    sampler = threading.Thread(target=sample_memory, args=(studio, memory, sampler_stop), daemon=True)
    sampler.start()
    crew = [Designer(i, studio, steps, lock, stop, tabs) for i in range(designers)]
    started = time.monotonic()
    for designer in crew:
        designer.thread.start()
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
        for designer in crew:
            designer.thread.join(JOB_WAIT_S + 10)
        sampler_stop.set()
        sampler.join()
    if fault is not None:
        report["at_s"] = report.pop("at") - started
    elapsed = time.monotonic() - started
    return Run(fault or "load", elapsed, steps, memory, report).figures()


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
                with urllib.request.urlopen(result.url, timeout=60) as response:
                    same = hashlib.sha256(response.read()).hexdigest() == result.digest
            except OSError as error:
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


# --- the faults ------------------------------------------------------------------------------------


def inject(fault: str, studio: Studio) -> dict:
    """Do the fault; what was done, when (monotonic "at"), and what its checks found."""
    return {"fault": fault, **FAULT_ACTIONS[fault](studio)}


def _one(studio: Studio, role: str) -> psutil.Process:
    for _ in range(100):  # a model may be reloading right now
        process = studio.processes().get(role)
        if process is not None:
            return process
        time.sleep(0.1)
    raise RuntimeError(f"no {role} process under the studio")


def _generate_stub(studio: Studio) -> psutil.Process:
    return _one(studio, f"stub {MODELS_BY_TASK['generate'].name}")


def kill_model(studio: Studio) -> dict:
    stub = _generate_stub(studio)
    at = time.monotonic()
    stub.send_signal(signal.SIGKILL)
    return {"at": at, "did": f"SIGKILL the {MODELS_BY_TASK['generate'].name} stub (pid {stub.pid})"}


def restart_triton(studio: Studio) -> dict:
    triton = _one(studio, "tritonserver")
    at = time.monotonic()
    triton.send_signal(signal.SIGTERM)
    return {"at": at, "did": f"SIGTERM tritonserver (pid {triton.pid})"}


def restart_endpoint(studio: Studio) -> dict:
    endpoint = _one(studio, "endpoint")
    at = time.monotonic()
    endpoint.send_signal(signal.SIGTERM)
    return {"at": at, "did": f"SIGTERM the endpoint (pid {endpoint.pid})"}


def kill_endpoint(studio: Studio) -> dict:
    tree = studio.processes()
    children = [p for role, p in tree.items() if role not in ("studio", "endpoint")]
    at = time.monotonic()
    tree["endpoint"].send_signal(signal.SIGKILL)
    gone_s, orphans = wait_gone(children)
    return {"at": at, "did": f"SIGKILL the endpoint (pid {tree['endpoint'].pid})",
            "orphans": orphans, "children": len(children), "children_gone_s": gone_s}


def kill_studio(studio: Studio) -> dict:
    if not studio.started_here:
        raise RuntimeError("kill-studio needs a studio this script started (it starts it again)")
    tree = studio.processes()
    children = [p for role, p in tree.items() if role != "studio"]
    at = time.monotonic()
    tree["studio"].send_signal(signal.SIGKILL)
    studio.process.wait()
    gone_s, orphans = wait_gone(children)
    studio.start()  # as a supervisor (systemd, a container's restart policy) would
    return {"at": at, "did": f"SIGKILL the studio (pid {tree['studio'].pid}), then start it again",
            "orphans": orphans, "children": len(children), "children_gone_s": gone_s}


def fill_cache(studio: Studio) -> dict:
    places = studio.endpoint_launcher()
    with urllib.request.urlopen(places.url + "/models", timeout=30) as response:
        limits = json.loads(response.read())["limits"]
    source = places.model_store / archive_name(MODELS_BY_TASK["generate"].name)
    direct = StudioClient.for_local(places.url)
    fillers, failures = [], []
    at = time.monotonic()
    for number in range(1, FILLER_MODELS + 1):
        name = f"filler/filler-{number}"  # another model as far as the endpoint is concerned
        target = places.model_store / f"{name}.tar.gz"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        fillers.append(target)
        try:
            direct.invoke(name, {"prompt": PROMPT, "negative_prompt": ""},
                          {"num_inference_steps": STEPS, "width": SIZE, "height": SIZE})
        except StudioError as error:
            failures.append(str(error))
    for target in fillers:
        target.unlink()  # gone from the store; still loaded until evicted
    with urllib.request.urlopen(places.url + "/models", timeout=30) as response:
        evicted = sum(m["evictions"] for m in json.loads(response.read())["models"])
    return {"at": at, "did": f"loaded {FILLER_MODELS} more models into an endpoint holding at most "
                             f"{limits['max_models']} models / {limits['max_gb'] or 'any'} GB",
            "filler_failures": failures, "evictions": evicted}


def unreadable_store(studio: Studio) -> dict:
    places = studio.endpoint_launcher()
    mode = places.model_store.stat().st_mode & 0o7777
    at = time.monotonic()
    places.model_store.chmod(0)
    try:
        stub = _generate_stub(studio)
        stub.send_signal(signal.SIGKILL)  # its next call must load it from the store
        time.sleep(UNREADABLE_HOLD_S)
    finally:
        places.model_store.chmod(mode)
    return {"at": at, "did": f"model store unreadable for {UNREADABLE_HOLD_S} s, the "
                             f"{MODELS_BY_TASK['generate'].name} stub killed meanwhile (pid {stub.pid})"}


FAULT_ACTIONS: dict[str, Callable[[Studio], dict]] = {
    "kill-model": kill_model, "restart-triton": restart_triton, "restart-endpoint": restart_endpoint,
    "kill-endpoint": kill_endpoint, "kill-studio": kill_studio, "fill-cache": fill_cache,
    "unreadable-store": unreadable_store,
}
assert tuple(FAULT_ACTIONS) == FAULTS


def fault_passed(figures: dict) -> bool:
    clear = all("Traceback" not in message for message in figures["messages"])
    return (clear and figures["lost"] == 0 and figures["history"]["intact"]
            and figures["recovery_s"] is not None and not figures.get("orphans"))


# --- printing ----------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_run(figures: dict) -> None:
    print(f"\n== {figures['name']}: {figures['seconds']:.0f} s ==")
    print(f"requests: {figures['sent']} sent, {figures['completed']} completed, {figures['failed']} failed, "
          f"{figures['lost']} lost")
    print(f"{'tab':10} {'done':>5} {'p50 s':>7} {'p95 s':>7}")
    for tab, row in figures["tabs"].items():
        print(f"{tab:10} {row['done']:>5} {_s(row['p50_s']):>7} {_s(row['p95_s']):>7}")
    print(f"throughput: {figures['jobs_per_minute']:.1f} jobs/min (generate, erase, restyle and upscale jobs done)")
    print(f"{'process':24} {'RSS MB first third':>19} {'last third':>11} {'ratio':>6}")
    for role, row in sorted(figures["memory"].items()):
        print(f"{role:24} {row['first_mb']:>19.0f} {row['last_mb']:>11.0f} {row['ratio']:>6.2f}"
              + ("  (restarted by the fault: not judged)" if row["restarted"] else ""))
    judged = [row["ratio"] for row in figures["memory"].values() if not row["restarted"]]
    print(f"memory grew: {'YES' if figures['memory_grew'] else 'no'} (largest last/first third median ratio "
          f"{max(judged, default=1.0):.2f} of the processes that ran throughout, limit {MEMORY_GROWTH_LIMIT:.2f})")
    if "fault" not in figures:
        return
    print(f"fault {figures['fault']} at {figures['at_s']:.0f} s: {figures['did']}")
    for key in ("evictions", "filler_failures"):
        if key in figures:
            print(f"  {key.replace('_', ' ')}: {figures[key]}")
    if "orphans" in figures:
        print(f"  its {figures['children']} child processes gone after {figures['children_gone_s']:.1f} s; "
              f"orphans: {figures['orphans'] or 'none'}")
    messages = figures["messages"]
    print(f"  designers were told ({figures['failed']} failed requests): "
          + ("nothing, no request failed" if not messages else ""))
    for message in messages:
        print(f"    - {message}")
    print(f"  clear (no traceback): {all('Traceback' not in m for m in messages)}; "
          f"accepted jobs lost: {figures['lost']} (each other one completed or reported its failure)")
    history = figures["history"]
    print(f"  history: {history['results_served']} earlier results of {history['designers']} designers served "
          f"unchanged, first ones restored: {'intact' if history['intact'] else 'BROKEN ' + str(history['problems'])}")
    recovery = figures["recovery_s"]
    print("  service back without a manual step: " + (f"every tab answered again {recovery:.1f} s after the fault"
          if recovery is not None else f"NO, not within {RECOVERY_LIMIT_S} s"))
    print(f"  fault handled: {'yes' if fault_passed(figures) else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designers", type=int, default=DEFAULT_DESIGNERS, help=f"1 to {MAX_DESIGNERS}")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"each run's, up to {MAX_SECONDS}")
    faults = parser.add_mutually_exclusive_group()
    faults.add_argument("--fault", choices=FAULTS)
    faults.add_argument("--faults", choices=["all"], help="the plain load, then each fault in turn")
    parser.add_argument("--studio-url", help="a studio already running on 127.0.0.1 (default: start one)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="the started studio's store, cache, results and logs (emptied first)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if not 1 <= args.designers <= MAX_DESIGNERS:
        parser.error(f"--designers must be 1 to {MAX_DESIGNERS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be more than 0 and at most {MAX_SECONDS}")
    if args.studio_url and urlparse(args.studio_url).hostname != "127.0.0.1":
        parser.error("--studio-url must be on 127.0.0.1: this script loads only a studio on this machine")
    names = list(FAULTS) if args.faults == "all" else [args.fault] if args.fault else []
    if args.studio_url and "kill-studio" in names:
        if args.fault:
            parser.error("kill-studio needs a studio this script starts (it starts it again): leave out --studio-url")
        names.remove("kill-studio")
        print("kill-studio left out: it needs a studio this script starts (it starts it again)")

    if args.studio_url:
        try:
            with urllib.request.urlopen(args.studio_url, timeout=10):
                pass
        except OSError as error:
            parser.error(f"no studio answers at {args.studio_url}: {error}")
        studio = Studio(args.work_dir, args.studio_url)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        if studio.pid is None:
            print("its process was not found (another user's?): no memory figures, and no fault can be injected")
    else:
        shutil.rmtree(args.work_dir, ignore_errors=True)
        args.work_dir.mkdir(parents=True)
        print(f"starting the studio and its local endpoint (tiny weights) in {args.work_dir} ...", flush=True)
        studio = Studio(args.work_dir).start()
    runs = []
    try:
        print(f"studio {studio.url} (pid {studio.pid}); {args.designers} designers, {args.seconds:.0f} s a run, "
              f"{SIZE} px, {STEPS} steps", flush=True)
        warm = time.monotonic()
        warm_up(studio)
        print(f"warm-up (every model loaded once): {time.monotonic() - warm:.0f} s", flush=True)
        for name in ([None] if not names or args.faults else []) + names:
            figures = run_load(studio, designers=args.designers, seconds=args.seconds, fault=name)
            print_run(figures)
            runs.append(figures)
    except RuntimeError as error:  # a fault this studio cannot take (no local endpoint of its own)
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        studio.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=1))
    healthy = all(run["failed"] == 0 and run["lost"] == 0 for run in runs if "fault" not in run)
    handled = all(fault_passed(run) for run in runs if "fault" in run)
    print(f"\nall requests of the plain load answered: {healthy}; every fault handled: {handled}")
    return 0 if healthy and handled else 1


if __name__ == "__main__":
    sys.exit(main())
