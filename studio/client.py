"""The client layer: typed calls to the four models behind one SageMaker multi-model endpoint.

The same code talks to a real endpoint on AWS (endpoint name + region) and to the local
endpoint (`make endpoint`, a URL): both speak the SageMaker Runtime InvokeEndpoint API,
so boto3's `sagemaker-runtime` client is the only transport, and the request format is the
models' own (sdserve.wire). No Gradio here.

`generate/restyle/erase/extend/upscale` (or `run(task, ...)`) take a tab's values as keywords,
check them as the tab does (studio.tasks.Task.check), plan the job (studio.planning: one
InvokeEndpoint carries at most 6 MB each way and runs at most 60 s on AWS, so a job that cannot
fit one call is split) and send its calls (studio.runner). `invoke` is one call.

Every failure comes out as StudioError (studio.errors), whose message is written for a designer.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from PIL import Image
from sdserve.budget import BUSY_WORDS
from sdserve.catalog import QUEUE_TIMEOUT_WORDS
from sdserve.redaction import redact
from sdserve.wire import RequestTooLarge, UnreadableAnswer, decode_answer, encode_request, invoke_arguments

from studio.endpoint_watch import warm_up_request
from studio.errors import JobCancelled, ModelLoading, StudioError
from studio.metadata import image_to_png
from studio.planning import plan_job
from studio.results import GenerationResult, JobResult
from studio.runner import StatusCallback, run_job
from studio.tasks import TASKS

log = logging.getLogger(__name__)

RETRYABLE_CODES = {"ModelNotReadyException", "ThrottlingException", "ServiceUnavailable", "InternalDependencyException"}
LOCAL_ENDPOINT_NAME = "sd-studio"


@dataclass
class EndpointConfig:
    endpoint_name: str
    region: str = "us-east-1"
    endpoint_url: str | None = None  # set for the local endpoint, None for AWS
    connect_timeout_s: float = 10
    read_timeout_s: float = 300  # a cold model on a GPU instance takes minutes to load
    max_attempts: int = 6  # retries on throttling and on "model still loading"
    backoff_s: float = 1.0

    @classmethod
    def from_env(cls) -> "EndpointConfig":
        """STUDIO_ENDPOINT_URL for the local endpoint, or STUDIO_ENDPOINT_NAME + AWS_REGION for AWS."""
        url = os.environ.get("STUDIO_ENDPOINT_URL")
        name = os.environ.get("STUDIO_ENDPOINT_NAME")
        if not url and not name:
            url = "http://127.0.0.1:8080"
        return cls(
            endpoint_name=name or LOCAL_ENDPOINT_NAME,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            endpoint_url=url,
        )

    @property
    def where(self) -> str:
        return self.endpoint_url or f"SageMaker endpoint {self.endpoint_name} ({self.region})"


@dataclass
class StudioClient:
    config: EndpointConfig
    runtime: Any = field(default=None, repr=False)  # a boto3 sagemaker-runtime client
    # Told of every call (studio.endpoint_watch.EndpointWatch): what the endpoint panel shows.
    watch: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = _runtime_client(self.config)

    @classmethod
    def for_sagemaker(cls, endpoint_name: str, region: str, **settings: Any) -> "StudioClient":
        return cls(EndpointConfig(endpoint_name=endpoint_name, region=region, **settings))

    @classmethod
    def for_local(cls, url: str = "http://127.0.0.1:8080", **settings: Any) -> "StudioClient":
        return cls(EndpointConfig(endpoint_name=LOCAL_ENDPOINT_NAME, endpoint_url=url, **settings))

    # --- the tabs: thin wrappers, their arguments are the table's (and an edit tool's settings) --

    def generate(self, prompt: str, *, negative_prompt: str = "", on_status: StatusCallback | None = None,
                 **gen_args: Any) -> GenerationResult:
        """Text to image. `gen_args`: the arguments of MODELS_BY_TASK["generate"] (sdserve.catalog)."""
        return self.run("generate", prompt, negative_prompt, gen_args, on_status=on_status)

    def restyle(self, image: Image.Image, prompt: str, *, negative_prompt: str = "",
                on_status: StatusCallback | None = None, **gen_args: Any) -> GenerationResult:
        """Depth-to-image: a new look for the image, keeping its shapes and depth."""
        return self.run("restyle", prompt, negative_prompt, gen_args, image=image, on_status=on_status)

    def erase(self, image: Image.Image, mask: Image.Image, prompt: str = "", *, negative_prompt: str = "",
              on_status: StatusCallback | None = None, **arguments: Any) -> GenerationResult:
        """Inpainting: repaint the white part of `mask` with what `prompt` describes; only the pixels the
        mask reaches change. `arguments`: the model's and Erase's settings (studio.edits.ERASE)."""
        return self.run("erase", prompt, negative_prompt, arguments, image=image, mask=mask, on_status=on_status)

    def extend(self, image: Image.Image, prompt: str = "", *, negative_prompt: str = "",
               on_status: StatusCallback | None = None, **arguments: Any) -> GenerationResult:
        """Outpainting: more canvas on the sides given (extend_left=128, ...; studio.edits.EXTEND), filled in."""
        return self.run("extend", prompt, negative_prompt, arguments, image=image, on_status=on_status)

    def upscale(self, image: Image.Image, prompt: str = "", *, negative_prompt: str = "",
                on_status: StatusCallback | None = None, **gen_args: Any) -> GenerationResult:
        """x4 upscaling (tiled beyond the model's ModelSpec.tiling); a prompt describing the image guides it."""
        return self.run("upscale", prompt, negative_prompt, gen_args, image=image, on_status=on_status)

    def run(
        self,
        task: str,
        prompt: str,
        negative_prompt: str,
        arguments: dict[str, Any],
        *,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        on_status: StatusCallback | None = None,
    ) -> JobResult:
        """One job of a task ("generate", ..., or an edit tool: "erase", "extend"), checked as its
        tab checks it, split into calls as studio.planning decides, sent at once.

        `arguments`: the model's generation arguments and the edit tool's settings, by name. A
        job whose calls all failed raises the StudioError of the failure; one that made some of
        its images raises studio.errors.PartialJobError, whose `result` carries the images made.
        """
        inputs = TASKS[task].check({"prompt": prompt, "negative_prompt": negative_prompt, **arguments}, image, mask)
        return run_job(self, plan_job(inputs), on_status=on_status).raise_for_errors()

    def warm_up(self, model: str) -> GenerationResult:
        """The smallest call `model` accepts, sent once (no retries): the endpoint loads the model
        for it. What "Send to" fires, so a cold load happens while the designer gets ready."""
        inputs, gen_args = warm_up_request(model)
        return self.invoke(model, inputs, gen_args, attempts=1, progress=False, warm_up=True)

    # --- the call itself ------------------------------------------------------------

    def invoke(
        self,
        model: str,
        inputs: dict[str, str | Image.Image],
        gen_args: dict[str, Any],
        *,
        on_status: StatusCallback | None = None,
        cancelled: threading.Event | None = None,
        progress: bool = True,
        attempts: int | None = None,
        warm_up: bool = False,
    ) -> GenerationResult:
        """One request to `model` in the article's KServe v2 shape; retries while it loads.

        `cancelled` set stops it before the first send and before any retry (JobCancelled); a
        request already sent is waited for. `progress=False` reports only retries (a split job
        reports its own progress, per call finished). `attempts` defaults to the config's
        max_attempts; `warm_up` tells the watch the call is a warm-up, not a designer's.
        """
        try:
            body = encode_request(inputs, gen_args)
        except RequestTooLarge as error:
            raise StudioError(str(error)) from None
        call = self.watch.call(model, warm_up=warm_up) if self.watch is not None else None
        try:
            result = self._send(model, body, on_status, cancelled, progress, attempts or self.config.max_attempts, call)
        except BaseException:
            if call is not None:
                call.failed()
            raise
        if call is not None:
            call.done(result.seconds, len(result.images))
        return result

    def _send(self, model: str, body: bytes, on_status: StatusCallback | None, cancelled: threading.Event | None,
              progress: bool, attempts: int, call: Any) -> GenerationResult:
        notify = on_status or (lambda message: None)
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            if cancelled is not None and cancelled.is_set():
                raise JobCancelled() if attempt == 1 else JobCancelled("Cancelled while waiting to retry.")
            if attempt == 1:
                if progress:
                    notify(f"Sending to {model}…")
            else:
                notify(f"{model} is loading on the endpoint, retrying (attempt {attempt})…")
            try:
                answer = self.runtime.invoke_endpoint(**invoke_arguments(self.config.endpoint_name, model, body))[
                    "Body"].read()
                break
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                failure = describe_failure(error, model, self.config)
                if call is not None and isinstance(failure, ModelLoading):
                    call.loading()
                if not failure.retryable or attempt == attempts:
                    raise failure from None
                delay = self.config.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                notify(f"{failure} Retrying in {delay:.0f} s…")
                if cancelled is not None:
                    cancelled.wait(delay)  # a cancel cuts the wait short; the loop then stops
                else:
                    time.sleep(delay)
        result = parse_answer(model, answer)
        result.seconds = time.monotonic() - started
        if progress:
            notify(f"{model} answered in {result.seconds:.1f} s.")
        return result


def _runtime_client(config: EndpointConfig) -> Any:
    # Retries are done by StudioClient.invoke, where "model still loading" can be reported.
    # botocore itself must not retry: its `max_attempts` counts retries *after* the first call, so
    # {"max_attempts": 1} let it send a timed-out or 5xx request a second time (the endpoint ran
    # the job twice and the designer waited twice the timeout). `total_max_attempts` counts calls.
    settings = botocore.config.Config(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    session_args: dict[str, Any] = {"region_name": config.region}
    if config.endpoint_url:
        # The local endpoint does not check signatures, but boto3 insists on signing.
        session_args.update(aws_access_key_id="local", aws_secret_access_key="local")
    return boto3.session.Session(**session_args).client(
        "sagemaker-runtime", endpoint_url=config.endpoint_url, config=settings
    )


# --- the answer, as the studio keeps it ------------------------------------------------------

def parse_answer(model: str, answer: bytes) -> GenerationResult:
    """The endpoint's answer (sdserve.wire): images as PNG, WebP or JPEG (the server's lossy
    fallback when a PNG would not fit one answer, named in the parameters' "encoding"), each kept
    as a PNG carrying its parameters."""
    try:
        decoded = decode_answer(answer)
    except UnreadableAnswer as error:
        raise StudioError(f"The endpoint's answer from {model} could not be read ({error}).") from None
    parameters = decoded.parameters
    png = [
        data if image.format == "PNG" else image_to_png(image, _image_parameters(parameters, index, image))
        for index, (data, image) in enumerate(zip(decoded.encoded, decoded.images))
    ]
    return GenerationResult(model=model, images=decoded.images, png=png, parameters=parameters, encoded=decoded.encoded)


def _image_parameters(parameters: dict[str, Any], index: int, image: Image.Image) -> dict[str, Any]:
    """What a lossy image's PNG carries: its row's parameters with its own seed and how it came."""
    seeds = parameters.get("seeds") or [parameters.get("seed")]
    seed = seeds[index] if index < len(seeds) else seeds[0]
    return {**parameters, "seed": seed, "encoding": parameters.get("encoding") or str(image.format).lower()}


# --- failures, in words a designer can act on --------------------------------------------

def redacted(text: str) -> str:
    """What a designer may read: no account ids, ARNs (an AccessDenied names the caller's IAM
    identity) or file paths (Triton's errors can carry them)."""
    return redact(text, arns=True, paths=True)


def describe_failure(error: Exception, model: str, config: EndpointConfig) -> StudioError:
    """A StudioError in words a designer can act on; the full text goes to the studio's log."""
    log.warning("call to %s via %s failed: %s", model, config.where, error)
    if isinstance(error, botocore.exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        if code == "ModelError":
            # The model had no time left for the call (busy), or it waited too long in Triton's queue
            # behind other calls (refused early rather than run late): either may go through later.
            text = redacted(_model_message(error.response, message))
            return StudioError(text, retryable=BUSY_WORDS in text or QUEUE_TIMEOUT_WORDS in text)
        if code == "ModelNotReadyException":
            return ModelLoading(model)
        if code in RETRYABLE_CODES:
            return StudioError(f"The endpoint is busy ({code}).", retryable=True)
        if code == "ValidationError":
            return StudioError(f"The endpoint refused the request: {redacted(message)}")
        if code == "InternalFailure" and message:
            # The endpoint's own account of what broke (say, its model server restarting): not retried,
            # since the call may have run.
            return StudioError(f"The endpoint failed: {redacted(message)}")
        return StudioError(f"The endpoint refused the studio's call ({code}); the details are in the studio's log.")
    if isinstance(error, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return StudioError(
            f"The endpoint did not answer within {config.read_timeout_s:.0f} s. Try fewer steps or a smaller size."
        )
    if isinstance(error, botocore.exceptions.ConnectionClosedError):
        # The call was sent and may have run: not retried, the designer decides.
        return StudioError("The endpoint closed the connection before answering (it may be restarting). Try again.")
    if isinstance(error, botocore.exceptions.EndpointConnectionError):
        return StudioError("Cannot reach the endpoint. Is it running? (The studio's log says where it looked.)")
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return StudioError("No AWS credentials were found for the SageMaker endpoint.")
    return StudioError("Calling the endpoint failed; the details are in the studio's log.")


def _model_message(response: dict, fallback: str) -> str:
    """The model's own words: Triton's {"error": "..."} inside SageMaker's ModelError."""
    original = response.get("OriginalMessage", "")
    try:
        original = json.loads(original).get("error", original)
    except (ValueError, AttributeError):
        pass
    return str(original or fallback)
