"""The client layer: typed calls to the four models behind one SageMaker multi-model endpoint.

The same code talks to a real endpoint on AWS (endpoint name + region) and to the local
endpoint (`make endpoint`, a URL): both speak the SageMaker Runtime InvokeEndpoint API,
so boto3's `sagemaker-runtime` client is the only transport. No Gradio here.

Every failure comes out as `StudioError`, whose message is written for a designer.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import boto3
import botocore.config
import botocore.exceptions
from PIL import Image

from sdserve.catalog import IMAGE, MASK_IMAGE, MODELS_BY_TASK, NEGATIVE_PROMPT, PROMPT

MAX_REQUEST_BYTES = 6 * 1024 * 1024  # invoke_endpoint refuses larger bodies
RETRYABLE_CODES = {"ModelNotReadyException", "ThrottlingException", "ServiceUnavailable", "InternalDependencyException"}
LOCAL_ENDPOINT_NAME = "sd-studio"

StatusCallback = Callable[[str], None]


class StudioError(Exception):
    """Something went wrong; `str(error)` is fit to show a designer as it is."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


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
class GenerationResult:
    model: str
    images: list[Image.Image]
    png: list[bytes]  # the images as the endpoint sent them, parameters embedded
    parameters: dict[str, Any]
    seconds: float = 0.0

    @property
    def seeds(self) -> list[int]:
        return self.parameters.get("seeds", [self.parameters.get("seed")])


@dataclass
class StudioClient:
    config: EndpointConfig
    runtime: Any = field(default=None, repr=False)  # a boto3 sagemaker-runtime client

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = _runtime_client(self.config)

    @classmethod
    def for_sagemaker(cls, endpoint_name: str, region: str, **settings: Any) -> "StudioClient":
        return cls(EndpointConfig(endpoint_name=endpoint_name, region=region, **settings))

    @classmethod
    def for_local(cls, url: str = "http://127.0.0.1:8080", **settings: Any) -> "StudioClient":
        return cls(EndpointConfig(endpoint_name=LOCAL_ENDPOINT_NAME, endpoint_url=url, **settings))

    @classmethod
    def from_env(cls) -> "StudioClient":
        return cls(EndpointConfig.from_env())

    # --- the four models: thin wrappers, their generation arguments are the table's ----------

    def generate(self, prompt: str, *, negative_prompt: str = "", on_status: StatusCallback | None = None,
                 **gen_args: Any) -> GenerationResult:
        """Text to image. `gen_args`: the arguments of MODELS_BY_TASK["generate"] (sdserve.catalog)."""
        return self.run("generate", prompt, negative_prompt, gen_args, on_status=on_status)

    def restyle(self, image: Image.Image, prompt: str, *, negative_prompt: str = "",
                on_status: StatusCallback | None = None, **gen_args: Any) -> GenerationResult:
        """Depth-to-image: a new look for the image, keeping its shapes and depth."""
        return self.run("restyle", prompt, negative_prompt, gen_args, image=image, on_status=on_status)

    def erase(self, image: Image.Image, mask: Image.Image, prompt: str = "", *, negative_prompt: str = "",
              on_status: StatusCallback | None = None, **gen_args: Any) -> GenerationResult:
        """Inpainting: repaint the white part of `mask` with what `prompt` describes."""
        return self.run("erase", prompt, negative_prompt, gen_args, image=image, mask=mask, on_status=on_status)

    def upscale(self, image: Image.Image, prompt: str = "", *, negative_prompt: str = "",
                on_status: StatusCallback | None = None, **gen_args: Any) -> GenerationResult:
        """x4 upscaling; a prompt describing the image guides the detail."""
        return self.run("upscale", prompt, negative_prompt, gen_args, image=image, on_status=on_status)

    def run(
        self,
        task: str,
        prompt: str,
        negative_prompt: str,
        gen_args: dict[str, Any],
        *,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        on_status: StatusCallback | None = None,
    ) -> GenerationResult:
        """One job of a task ("generate", ...); unknown generation arguments are refused here."""
        spec = MODELS_BY_TASK[task]
        unknown = sorted(set(gen_args) - set(spec.argument_names))
        if unknown:
            raise StudioError(
                f"{task} takes no argument {unknown[0]!r}; it takes {', '.join(spec.argument_names)}."
            )
        inputs: dict[str, str | Image.Image] = {PROMPT: prompt, NEGATIVE_PROMPT: negative_prompt}
        if spec.takes_image:
            inputs[IMAGE] = image
        if spec.takes_mask:
            inputs[MASK_IMAGE] = mask
        return self.invoke(spec.name, inputs, gen_args, on_status=on_status)

    # --- the call itself ------------------------------------------------------------

    def invoke(
        self,
        model: str,
        inputs: dict[str, str | Image.Image],
        gen_args: dict[str, Any],
        *,
        on_status: StatusCallback | None = None,
    ) -> GenerationResult:
        """One request to `model` in the article's KServe v2 shape; retries while it loads."""
        notify = on_status or (lambda message: None)
        body = build_payload(inputs, gen_args)
        started = time.monotonic()
        for attempt in range(1, self.config.max_attempts + 1):
            notify(f"Sending to {model}…" if attempt == 1 else f"{model} is loading on the endpoint, retrying (attempt {attempt})…")
            try:
                response = self.runtime.invoke_endpoint(
                    EndpointName=self.config.endpoint_name,
                    TargetModel=f"{model}.tar.gz",
                    ContentType="application/json",
                    Accept="application/json",
                    Body=body,
                )
                answer = response["Body"].read()
                break
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                failure = describe_failure(error, model, self.config)
                if not failure.retryable or attempt == self.config.max_attempts:
                    raise failure from None
                delay = self.config.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                notify(f"{failure} Retrying in {delay:.0f} s…")
                time.sleep(delay)
        result = parse_answer(model, answer)
        result.seconds = time.monotonic() - started
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


# --- payload in, result out -------------------------------------------------------------

def build_payload(inputs: dict[str, str | Image.Image], gen_args: dict[str, Any]) -> bytes:
    """The article's JSON body, kept under invoke_endpoint's 6 MB limit.

    PNG is sent when it fits; a photo too large as PNG is sent again as high-quality JPEG;
    a request still too large is refused with what to do about it.
    """
    body = _payload(inputs, gen_args, image_format="PNG")
    if len(body) <= MAX_REQUEST_BYTES:
        return body
    body = _payload(inputs, gen_args, image_format="JPEG")
    if len(body) <= MAX_REQUEST_BYTES:
        return body
    image = inputs.get(IMAGE)
    side = max(image.size) if isinstance(image, Image.Image) else 0
    raise StudioError(
        f"The request is {len(body) / 2**20:.1f} MB even as JPEG, over the endpoint's 6 MB limit. "
        f"Make the image smaller (it is {side} px on its long side) and try again."
    )


def _payload(inputs: dict[str, str | Image.Image], gen_args: dict[str, Any], *, image_format: str) -> bytes:
    values = {
        # Masks stay PNG: JPEG would smear the brush edge into grey.
        name: encode_image(value, "PNG" if name == MASK_IMAGE else image_format)
        if isinstance(value, Image.Image)
        else value
        for name, value in inputs.items()
    }
    values["gen_args"] = json.dumps(gen_args)
    return json.dumps(
        {"inputs": [{"name": name, "shape": [1, 1], "datatype": "BYTES", "data": [data]} for name, data in values.items()]}
    ).encode("utf-8")


def encode_image(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_answer(model: str, answer: bytes) -> GenerationResult:
    try:
        outputs = {output["name"]: output["data"] for output in json.loads(answer)["outputs"]}
        png = [base64.b64decode(data) for data in outputs["generated_image"]]
        images = [Image.open(io.BytesIO(data)) for data in png]
        for image in images:
            image.load()
        parameters = json.loads(outputs["parameters"][0]) if "parameters" in outputs else {}
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise StudioError(f"The endpoint's answer from {model} could not be read ({error}).") from None
    return GenerationResult(model=model, images=images, png=png, parameters=parameters)


# --- failures, in words a designer can act on --------------------------------------------

def describe_failure(error: Exception, model: str, config: EndpointConfig) -> StudioError:
    if isinstance(error, botocore.exceptions.ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        if code == "ModelError":
            return StudioError(_model_message(error.response, message))
        if code == "ModelNotReadyException":
            return StudioError(f"The {model} model is still loading on the endpoint.", retryable=True)
        if code in RETRYABLE_CODES:
            return StudioError(f"The endpoint is busy ({code}).", retryable=True)
        if code == "ValidationError":
            return StudioError(f"The endpoint refused the request: {message}")
        return StudioError(f"The endpoint answered with an error ({code}): {message}")
    if isinstance(error, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)):
        return StudioError(
            f"{config.where} did not answer within {config.read_timeout_s:.0f} s. Try fewer steps or a smaller size."
        )
    if isinstance(error, botocore.exceptions.EndpointConnectionError):
        return StudioError(f"Cannot reach {config.where}. Is it running?")
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return StudioError("No AWS credentials were found for the SageMaker endpoint.")
    return StudioError(f"Calling {config.where} failed: {error}")


def _model_message(response: dict, fallback: str) -> str:
    """The model's own words: Triton's {"error": "..."} inside SageMaker's ModelError."""
    original = response.get("OriginalMessage", "")
    try:
        original = json.loads(original).get("error", original)
    except (ValueError, AttributeError):
        pass
    return str(original or fallback)
