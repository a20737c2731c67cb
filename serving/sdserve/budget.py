"""How long a pipeline call will take, and the time one call may take.

A SageMaker invocation gets 60 s; part of that is spent queued in Triton (its queue policy
refuses a request that waited too long), the rest is the pipeline call's budget. Each loaded
model measures its own speed on its recent calls (seconds per unit of work: images x denoising
steps x megapixels), so the same code knows a GPU from a CPU without a table of hardware, and
predicts a call's time before making it. A call predicted to run over is refused at once, with
what to lower; a call that runs over anyway is stopped at the next denoising step.

Standard library only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError

# Weight of the newest call in the running speed estimate: recent calls count most (a model
# warms up, the machine's load changes), one odd call does not swing it.
NEWEST_CALL_WEIGHT = 0.5


def denoising_steps(args: dict[str, Any]) -> int:
    """The steps a call really runs: image-to-image pipelines skip the first (1 - strength)."""
    steps = args["num_inference_steps"]
    return int(steps * args["strength"]) if "strength" in args else steps


def work_units(args: dict[str, Any], size: tuple[int, int], images: int = 1) -> float:
    """images x denoising steps x megapixels of one call."""
    return images * denoising_steps(args) * size[0] * size[1] / 1e6


@dataclass
class WorkBudget:
    """The time one pipeline call may take on this model, and its measured speed."""

    seconds: float
    seconds_per_unit: float | None = None  # None until a call has been measured
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predict(self, units: float) -> float | None:
        """Seconds a call of `units` will take, or None before the first measurement."""
        rate = self.seconds_per_unit
        return None if rate is None else rate * units

    def record(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        rate = seconds / units
        with self._lock:
            previous = self.seconds_per_unit
            self.seconds_per_unit = rate if previous is None else (
                NEWEST_CALL_WEIGHT * rate + (1 - NEWEST_CALL_WEIGHT) * previous
            )

    def refusal(self, model: str, args: dict[str, Any], units: float, *, within: float | None = None) -> RequestError | None:
        """A RequestError naming what to lower when a call of `units` will not fit, else None.

        `within` is the time left in this batch (default: the whole budget).
        """
        predicted = self.predict(units)
        limit = self.seconds if within is None else within
        if predicted is None or predicted <= limit:
            return None
        if within is not None and predicted <= self.seconds:
            return CallOverBudget(
                "gen_args",
                f"the endpoint is busy: {model} has {max(0.0, within):.0f} s left of this invocation's "
                f"{self.seconds:.0f} s budget after the calls before it, and this one needs about "
                f"{predicted:.0f} s; try again",
            )
        return CallOverBudget(
            "gen_args",
            f"this call would take about {predicted:.0f} s on {model} here, over the {self.seconds:.0f} s one "
            f"invocation may take; lower {what_to_lower(args)}",
        )


class CallOverBudget(RequestError):
    """A call that cannot (or did not) finish within the time one invocation may take."""


def what_to_lower(args: dict[str, Any]) -> str:
    """The arguments that make a call shorter, as a designer would lower them, with their values."""
    levers = [f"num_inference_steps (now {args['num_inference_steps']})"]
    if "strength" in args:
        levers.append(f"strength (now {args['strength']:g})")
    if "width" in args:
        levers.append(f"width x height (now {args['width']}x{args['height']})")
    else:
        levers.append("the image size")
    levers.append(f"num_images_per_prompt (now {args['num_images_per_prompt']})")
    return ", ".join(levers[:-1]) + " or " + levers[-1]
