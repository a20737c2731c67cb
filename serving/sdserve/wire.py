"""One InvokeEndpoint call in the models' KServe v2 JSON (the reference article's), from the
caller's side: the request made of the inputs, and the answer read back into images and
parameters. The server's side of the same contract is sdserve.batch and sdserve.triton_model;
both take the tensor names from sdserve.catalog.

Used by the studio's client (studio.client) and by the deploy tool's smoke test (deploy.invoke),
which must work without the studio. Standard library and PIL only: the studio's image copies
serving/sdserve as `sdserve`, without torch.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .catalog import GEN_ARGS, GENERATED_IMAGE, IMAGE, MASK_IMAGE, MAX_PAYLOAD_BYTES, PARAMETERS
from .images import ALLOWED_FORMATS

CONTENT_TYPE = "application/json"
# What an answer carries besides the pixels: the KServe JSON around the images, the parameters
# (twice per image: the PNG's text chunk and the parameters output, each with a prompt and a
# negative prompt of up to 4000 characters, \u-escaped and escaped again inside JSON: about 240 KB
# at worst), and PNG/zlib framing.
ANSWER_OVERHEAD_BYTES = 512 * 1024

Inputs = Mapping[str, "str | Image.Image"]


class RequestTooLarge(ValueError):
    """A request over MAX_PAYLOAD_BYTES even with its image as JPEG; the message says what to do."""


class UnreadableAnswer(ValueError):
    """An answer that is not the models' KServe JSON of readable images."""


def invoke_arguments(endpoint_name: str, model: str, body: bytes) -> dict[str, Any]:
    """boto3 sagemaker-runtime `invoke_endpoint`'s keywords for one call to `model` (its archive,
    `<model>.tar.gz`, is the multi-model endpoint's TargetModel)."""
    return {"EndpointName": endpoint_name, "TargetModel": f"{model}.tar.gz", "ContentType": CONTENT_TYPE,
            "Accept": CONTENT_TYPE, "Body": body}


def encode_request(inputs: Inputs, gen_args: Mapping[str, Any]) -> bytes:
    """The JSON body of one call (one row), kept under invoke_endpoint's MAX_PAYLOAD_BYTES.

    `inputs` by KServe input name: text, or a PIL image. PNG is sent when it fits; a photo too
    large as PNG is sent again as high-quality JPEG; a request still too large is RequestTooLarge.
    """
    body = _body(inputs, gen_args, image_format="PNG")
    if len(body) <= MAX_PAYLOAD_BYTES:
        return body
    body = _body(inputs, gen_args, image_format="JPEG")
    if len(body) <= MAX_PAYLOAD_BYTES:
        return body
    image = inputs.get(IMAGE)
    side = max(image.size) if isinstance(image, Image.Image) else 0
    raise RequestTooLarge(
        f"The request is {len(body) / 2**20:.1f} MB even as JPEG, over the endpoint's "
        f"{MAX_PAYLOAD_BYTES / 2**20:.0f} MB limit. Make the image smaller (it is {side} px on its long side) "
        "and try again."
    )


def _body(inputs: Inputs, gen_args: Mapping[str, Any], *, image_format: str) -> bytes:
    values = {
        # Masks stay PNG: JPEG would smear the brush edge into grey.
        name: encode_image(value, "PNG" if name == MASK_IMAGE else image_format)
        if isinstance(value, Image.Image)
        else value
        for name, value in inputs.items()
    }
    values[GEN_ARGS] = json.dumps(dict(gen_args))
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


@dataclass
class Answer:
    """One call's answer: its images (decoded), their bytes as sent, and the row's parameters."""

    images: list[Image.Image]
    # PNG, or the server's lossy WebP/JPEG when a PNG would not fit one answer (the parameters'
    # "encoding" says which).
    encoded: list[bytes]
    parameters: dict[str, Any]


def decode_answer(answer: bytes) -> Answer:
    """The images and parameters of an answer; UnreadableAnswer saying what is wrong with it."""
    try:
        outputs = {output["name"]: output["data"] for output in json.loads(answer)["outputs"]}
        encoded = [base64.b64decode(data) for data in outputs[GENERATED_IMAGE]]
        images = []
        for data in encoded:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            image.load()
            images.append(image)
        parameters = json.loads(outputs[PARAMETERS][0]) if PARAMETERS in outputs else {}
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise UnreadableAnswer(str(error)) from None
    return Answer(images, encoded, parameters)


def worst_case_answer_bytes(width: int, height: int) -> int:
    """The largest answer one image of `width` x `height` can take: raw RGB (noise does not
    compress) plus PNG's filter byte per row, as base64, plus ANSWER_OVERHEAD_BYTES."""
    raw = width * height * 3 + height
    return 4 * math.ceil(raw / 3) + ANSWER_OVERHEAD_BYTES
