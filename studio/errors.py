"""The studio's errors. Each message is written for a designer and shown as it is; the modules
that raise them (checks, planning, the client, the scheduler, the store) all take them from here."""

from __future__ import annotations

from typing import Any


class StudioError(Exception):
    """Something went wrong; `str(error)` is fit to show a designer as it is."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class ModelLoading(StudioError):
    """The endpoint is still loading the model (ModelNotReadyException): try again shortly."""

    def __init__(self, model: str):
        super().__init__(f"The {model} model is still loading on the endpoint.", retryable=True)


class JobCancelled(StudioError):
    """The job was cancelled before this call was sent (or before a retry of it was)."""

    def __init__(self, message: str = "Cancelled before it was sent."):
        super().__init__(message)


class StudioBusy(StudioError):
    """The scheduler's queue of waiting jobs is full."""


class PartialJobError(StudioError):
    """Some of a job's images were made and some were not: `result` (a studio.runner.JobResult)
    carries those made (show them), `str(error)` says what failed and why the job was split."""

    def __init__(self, message: str, *, result: Any):
        super().__init__(message)
        self.result = result
