"""The simulated designers: each its own gradio_client session on the studio's named API, chaining
generate -> erase (with a mask) -> restyle -> upscale -> restore, each step noted with its time
and what the designer was told."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from bench.harness import designer_client
from bench.load.studio_tree import Studio
from deploy.invoke import PROMPT

SIZE, STEPS = 64, 2  # quick on a CPU with the tiny weights
MODEL_TABS = ("generate", "erase", "restyle", "upscale")  # a designer's chain, in order
RESTORE = "restore"
FAILURE_PAUSE_S = 2.0  # a designer told a job failed tries again after this
JOB_WAIT_S = 240  # a job without an answer by then counts as lost (the studio's own calls give up sooner)
RECOVERY_LIMIT_S = 300  # after a fault, every tab must answer again within this


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
        self.cookies: dict[str, str] = {}
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
                # The cookies of the session before (a browser keeps them): the same visitor.
                self.client = designer_client(self.studio.url, auth=self.studio.account(self.index),
                                              cookies=self.cookies)
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
            self.cookies, self.client = dict(self.client.cookies), None
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
        data = self.studio.read(url, self.client.cookies if self.client else None)
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
