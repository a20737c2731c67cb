"""python -m studio.replay SESSION.zip: every step of an exported chain made again, and how close.

    python -m studio.replay session.zip                                  # starts the checkout's local endpoint
    python -m studio.replay session.zip --endpoint-url http://127.0.0.1:8080
    python -m studio.replay session.zip --endpoint-name NAME --region REGION     # a SageMaker endpoint
    python -m studio.replay session.zip --strict         # exit 1 when a step is off by more than one level

The zip is read as an import reads it (studio.exchange.read_zip, every check). Each step is made
again in lineage order through the client layer, as its tab makes it (Task.check, plan_job,
run_job: StudioClient.run): its parameters give the values of its tab's controls (that one
image's seed and variation seed, the edit's settings), its parent's *replayed* result is its
input image (its own input from the zip where its parent is not in the zip), and its mask is
the zip's. So a difference early in a chain shows in every step after it.

Per step it prints the task, the seconds the replay took and the largest difference from the
original in levels of 255. The project's determinism guarantee (docs/endpoint.md, "Determinism")
is one level: against the same endpoint and weights every step is within it. Across other
hardware a step may be further off; that is reported, and the exit status is 0 unless --strict.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.endpoint_options import (
    add_endpoint_arguments,
    check_endpoint_arguments,
    open_endpoint,
)
from studio.errors import StudioError
from studio.exchange import Chain, Step, decode_png, read_zip
from studio.tasks import TASKS

# The project's determinism guarantee (docs/endpoint.md, "Determinism"): the same model,
# weights, parameters and seed give the same image within one level of 255 in every pixel.
DETERMINISM_LEVELS = 1


@dataclass(frozen=True)
class StepReplay:
    """How one step's replay went."""

    number: int  # 1-based, in lineage order
    task: str
    seconds: float | None  # None when it was not made
    difference: int | None  # the largest difference in levels of 255; None when not compared
    problem: str | None = None  # why it was not made or not compared

    @property
    def within(self) -> bool:
        return self.problem is None and self.difference is not None and self.difference <= DETERMINISM_LEVELS

    def line(self, steps: int) -> str:
        head = f"{self.number:>{len(str(steps))}}/{steps}  {self.task:<9}"
        if self.problem is not None:
            return f"{head}  {'-' if self.seconds is None else f'{self.seconds:6.1f} s'}  NOT REPLAYED: {self.problem}"
        verdict = "ok" if self.within else f"OVER the {DETERMINISM_LEVELS}-level guarantee"
        return f"{head}  {self.seconds:6.1f} s  largest difference {self.difference} of 255  {verdict}"


def replay_values(step: Step) -> dict[str, Any]:
    """The values of the step's tab's controls that make its one image again: those its
    parameters give (its own seed and variation seed among them), as one image."""
    task = TASKS[step.task]
    values = {control.name: step.parameters[control.name] for control in task.controls
              if control.name in step.parameters}
    if "num_images_per_prompt" in values:
        values["num_images_per_prompt"] = 1  # this image's own seeds are in its parameters
    return values


def replay_chain(chain: Chain, client: Any, *, clock: Callable[[], float] = time.perf_counter,
                 on_step: Callable[[StepReplay], None] | None = None) -> list[StepReplay]:
    """Every step of `chain` made again through `client` (a StudioClient), in lineage order."""
    made: dict[str, Image.Image] = {}  # step id -> its replayed image
    reports = []
    for number, step in enumerate(chain.steps, start=1):
        report = _replay_step(number, step, made, client, clock)
        reports.append(report)
        if on_step is not None:
            on_step(report)
    return reports


def _replay_step(number: int, step: Step, made: dict[str, Image.Image], client: Any,
                 clock: Callable[[], float]) -> StepReplay:
    task = TASKS[step.task]
    image = mask = None
    if task.takes_image:
        if step.parent is not None:
            image = made.get(step.parent)
            if image is None:
                return StepReplay(number, step.task, None, None, "its parent was not replayed")
        elif "image" in step.inputs:
            image = decode_png(step.inputs["image"])
        else:
            return StepReplay(number, step.task, None, None, "the zip has neither its parent nor its input image")
    if task.takes_mask and "mask" in step.inputs:
        mask = decode_png(step.inputs["mask"])
    values = replay_values(step)
    prompt, negative_prompt = values.pop("prompt", ""), values.pop("negative_prompt", "")
    started = clock()
    try:
        result = client.run(step.task, prompt, negative_prompt, values, image=image, mask=mask)
    except StudioError as error:
        return StepReplay(number, step.task, clock() - started, None, str(error))
    seconds = clock() - started
    replayed = result.images[0].convert("RGB")
    made[step.id] = replayed
    original = decode_png(step.png).convert("RGB")
    if replayed.size != original.size:
        return StepReplay(number, step.task, seconds, None,
                          f"it came out {replayed.size[0]}×{replayed.size[1]} px, the original is "
                          f"{original.size[0]}×{original.size[1]} px")
    return StepReplay(number, step.task, seconds, largest_difference(replayed, original))


def largest_difference(first: Image.Image, second: Image.Image) -> int:
    """The largest difference of any pixel's channel, in levels of 255."""
    return int(np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).max())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m studio.replay",
        description="Make every step of an exported chain again and say how close each came to the original.",
    )
    parser.add_argument("zip", type=Path, help="a session or chain export of the studio (.zip)")
    add_endpoint_arguments(parser)
    parser.add_argument("--strict", action="store_true",
                        help=f"exit 1 when a step is more than {DETERMINISM_LEVELS} level off, or was not replayed")
    args = parser.parse_args(argv)
    check_endpoint_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        chain = read_zip(args.zip)
    except (StudioError, OSError) as error:
        print(f"{args.zip.name}: {error}", file=sys.stderr)
        return 2
    steps = len(chain.steps)
    with contextlib.ExitStack() as stack:
        endpoint = open_endpoint(args, stack)
        print(f"Replaying {steps} step{'s' if steps != 1 else ''} of {args.zip.name} against {endpoint.where}.",
              flush=True)
        reports = replay_chain(chain, endpoint.client_factory(),
                               on_step=lambda report: print(report.line(steps), flush=True))
    off = [report for report in reports if not report.within]
    if not off:
        print(f"Every step is within the determinism guarantee ({DETERMINISM_LEVELS} level of 255).")
        return 0
    print(f"{len(off)} of {steps} steps are not within the determinism guarantee ({DETERMINISM_LEVELS} level of "
          f"255): step{'s' if len(off) != 1 else ''} {', '.join(str(report.number) for report in off)}.")
    return 1 if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
