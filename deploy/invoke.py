"""Smoke test of the live endpoint: one call per model, straight through boto3's sagemaker-runtime
in the models' own request format (sdserve.wire); no studio needed.

The sample calls are also what the benchmarks send through the studio's client (`sample_job`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from PIL import Image
from sdserve.catalog import IMAGE, MASK_IMAGE, MIN_IMAGE_SIDE, MODELS, NEGATIVE_PROMPT, PROMPT as PROMPT_INPUT, ModelSpec
from sdserve.wire import RequestTooLarge, UnreadableAnswer, decode_answer, encode_request, invoke_arguments

from deploy.aws import redact
from deploy.config import DeployConfig

PROMPT = "a house under a blue sky, green hills and a tree"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SMOKE_SIZE = 512
# A model not yet on an instance is loaded from S3 on its first call, which is answered with
# ModelNotReadyException meanwhile: the call is sent again, after 2, 4, 8, ... s (about 2 min in all).
LOADING_ATTEMPTS = 7
LOADING_BACKOFF_S = 2.0
READ_TIMEOUT_S = 300  # a cold model on a GPU instance takes minutes to load


def sample_image(size: int) -> Image.Image:
    """The studio's sample picture (assets/sample.png) at `size` x `size`."""
    with Image.open(ASSETS_DIR / "sample.png") as image:
        return image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def sample_mask(size: int) -> Image.Image:
    """Its mask (white over the tree), at `size` x `size`, hard-edged."""
    with Image.open(ASSETS_DIR / "sample_mask.png") as mask:
        return mask.convert("L").resize((size, size), Image.Resampling.NEAREST)


def sample_call(spec: ModelSpec, size: int, **gen_args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, gen_args) of one call of `spec`'s model on the sample picture, making `size` x `size`
    images: the input is the sample at `size / output_scale` (the upscaler's input is a quarter of
    its output), with the sample mask where the model takes one."""
    inputs: dict[str, Any] = {PROMPT_INPUT: PROMPT, NEGATIVE_PROMPT: ""}
    if not spec.takes_image:  # the size is the width and height arguments
        return inputs, {"width": size, "height": size, **gen_args}
    side = max(MIN_IMAGE_SIDE, size // spec.output_scale)
    inputs[IMAGE] = sample_image(side)
    if spec.takes_mask:
        inputs[MASK_IMAGE] = sample_mask(side)
    return inputs, dict(gen_args)


def sample_job(client: Any, spec: ModelSpec, size: int, **gen_args: Any) -> Any:
    """`sample_call` as a job of the studio's client (`client` is a studio.client.StudioClient)."""
    inputs, arguments = sample_call(spec, size, **gen_args)
    return client.run(spec.task, inputs[PROMPT_INPUT], inputs[NEGATIVE_PROMPT], arguments,
                      image=inputs.get(IMAGE), mask=inputs.get(MASK_IMAGE))


def smoke_test(cfg: DeployConfig, out_dir: Path, *, steps: int, seed: int, runtime: Any = None) -> bool:
    """True when every model answered; each image is written to `out_dir`. `runtime`: a boto3
    sagemaker-runtime client (default: one for the endpoint's region)."""
    runtime = runtime or boto3.session.Session(region_name=cfg.region).client(
        "sagemaker-runtime",
        # The loop below sends a loading model's call again; botocore must not send any call twice.
        config=botocore.config.Config(read_timeout=READ_TIMEOUT_S, retries={"total_max_attempts": 1}),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    for model in cfg.models:
        inputs, gen_args = sample_call(MODELS[model], SMOKE_SIZE, num_inference_steps=steps, seed=seed)
        try:
            answer = decode_answer(_invoke(runtime, cfg.endpoint_name, model, encode_request(inputs, gen_args)))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, RequestTooLarge,
                UnreadableAnswer) as error:
            print(redact(f"{model}: FAILED: {error}"))
            ok = False
            continue
        for index, image in enumerate(answer.images):
            path = out_dir / f"{model}-{index}.png"
            image.save(path)
            print(f"{model}: {path} ({image.width}x{image.height}, parameters {answer.parameters})")
    return ok


def _invoke(runtime: Any, endpoint_name: str, model: str, body: bytes) -> bytes:
    """The answer's body, the call sent again while the endpoint says the model is still loading."""
    attempt = 1
    while True:
        try:
            return runtime.invoke_endpoint(**invoke_arguments(endpoint_name, model, body))["Body"].read()
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ModelNotReadyException" or attempt == LOADING_ATTEMPTS:
                raise
        delay = LOADING_BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random())
        print(f"{model}: still loading on the endpoint; trying again in {delay:.0f} s")
        time.sleep(delay)
        attempt += 1
