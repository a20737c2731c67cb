"""The seven faults, injected into a studio under load, and what each must leave behind:

  kill-model         SIGKILL the stub of the Generate tab's model
  restart-triton     SIGTERM tritonserver (the endpoint's watchdog starts it again)
  restart-endpoint   SIGTERM the endpoint (graceful; the studio starts it again)
  kill-endpoint      SIGKILL the endpoint; its tritonserver and stubs must not outlive it
  kill-studio        SIGKILL the studio; its endpoint, tritonserver and stubs must not outlive
                     it; then start the studio again, as a supervisor would
  fill-cache         load models the designers do not use until the endpoint must evict theirs
  unreadable-store   make the model store unreadable, crash the Generate model so that it must
                     be loaded from there, then make the store readable again
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable

import psutil

from bench.load.designers import SIZE, STEPS
from bench.load.studio_tree import Studio, wait_gone
from deploy.invoke import PROMPT
from sdserve.catalog import MODELS_BY_TASK
from serving.archive import archive_name
from studio.client import StudioClient, StudioError

FAULTS = ("kill-model", "restart-triton", "restart-endpoint", "kill-endpoint", "kill-studio", "fill-cache",
          "unreadable-store")
FILLER_MODELS = 2  # fill-cache: models loaded beside the designers', each evicting one of theirs
UNREADABLE_HOLD_S = 15  # unreadable-store: how long the store stays unreadable


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
    studio.wait_exit()
    gone_s, orphans = wait_gone(children)
    studio.start()  # as a supervisor (systemd, a container's restart policy) would
    return {"at": at, "did": f"SIGKILL the studio (pid {tree['studio'].pid}), then start it again",
            "orphans": orphans, "children": len(children), "children_gone_s": gone_s}


def fill_cache(studio: Studio) -> dict:
    places = studio.endpoint()
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
    places = studio.endpoint()
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
