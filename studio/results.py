"""What a call and a job give back: `GenerationResult` (one call's images, or one finished image of
a job), and `JobResult` (a job's images and what went wrong with the rest, in words a designer
can act on: `problem`, `raise_for_errors`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from studio.errors import JobCancelled, PartialJobError, StudioError
from studio.planning import JobPlan, PlannedCall


@dataclass
class GenerationResult:
    model: str
    images: list[Image.Image]
    # Each image as PNG with its parameters embedded: the endpoint's own bytes when it sent a PNG;
    # when it had to send a lossy WebP/JPEG (to fit one answer), a lossless PNG of exactly those
    # pixels, so what the studio keeps and downloads is always a PNG that carries its parameters.
    png: list[bytes]
    parameters: dict[str, Any]
    seconds: float = 0.0
    # The images' bytes exactly as the endpoint sent them (PNG, WebP or JPEG); empty when the
    # result was put together by the studio (a stitched upscale, a pasted edit).
    encoded: list[bytes] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return self.parameters.get("seeds", [self.parameters.get("seed")])


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class CallFailure:
    """A call that was sent (or could not be queued) and did not give a usable answer."""

    call: PlannedCall
    error: StudioError

    def __str__(self) -> str:
        text = f"{capitalized(self.call.label)} (seed {self.call.seed}) failed: {self.error}"
        return text if text.endswith(".") else text + "."


@dataclass
class JobResult(GenerationResult):
    """A job's images (those made, in seed order) and what went wrong with the rest.

    `parameters` are the first image's, with the job's `seed`, the made images' `seeds` and the
    job's `num_images_per_prompt`; each PNG carries its own image's parameters.
    """

    plan: JobPlan | None = None
    failures: list[CallFailure] = field(default_factory=list)
    cancelled: bool = False
    calls_sent: int = 0
    image_indices: list[int] = field(default_factory=list)  # each image's index in the job

    @property
    def complete(self) -> bool:
        return not self.failures and not self.cancelled

    def problem(self) -> str | None:
        """What went wrong, for the designer; None when nothing did."""
        if self.complete:
            return None
        plan = self.plan
        total = plan.image_count if plan else len(self.images)
        lines = []
        if total > 1:
            lines.append(f"{len(self.images)} of {total} images were made.")
        elif plan and plan.layout is not None and self.failures:
            lines.append(f"The {plan.title.lower()} failed and nothing was kept: "
                         "an image with a missing tile would have a hole.")
        if self.cancelled:
            calls = plan.call_count if plan else self.calls_sent
            lines.append(f"Cancelled after {self.calls_sent} of {calls} calls were sent; the rest were not sent.")
        # The same reason once, with the calls it stopped: a refused job fails every call alike.
        by_reason: dict[str, list[CallFailure]] = {}
        for failure in self.failures:
            by_reason.setdefault(str(failure.error), []).append(failure)
        for reason, failures in list(by_reason.items())[:3]:
            if len(failures) == 1:
                lines.append(str(failures[0]))
            else:
                labels = ", ".join(failure.call.label for failure in failures)
                lines.append(capitalized(f"{labels} failed: {reason}".rstrip(".") + "."))
        if len(by_reason) > 3:
            lines.append(f"{sum(len(f) for f in list(by_reason.values())[3:])} more calls failed.")
        if total > 1 and plan and plan.layout is not None and self.failures:
            lines.append("An image with a failed tile is not kept: it would have a hole.")
        if plan and plan.is_split and self.failures:
            lines.append(plan.summary)  # why it was split, naming the limit
        return " ".join(lines)

    def raise_for_errors(self) -> JobResult:
        """This result if nothing went wrong; else StudioError (nothing made) or PartialJobError."""
        if self.complete:
            return self
        if not self.images:
            if len(self.failures) == 1 and self.plan is not None and not self.plan.is_split:
                raise self.failures[0].error  # a one-call job fails with the call's own words
            if self.cancelled and not self.failures:
                raise JobCancelled(self.problem() or "Cancelled.")
            raise StudioError(self.problem() or "Nothing was made.")
        raise PartialJobError(self.problem() or "", result=self)
