"""The studio's client layer without a model server: the payload it builds (sdserve.wire, which
the deploy tool's smoke test speaks too), the 6 MB limit, reading answers (PNG, or the server's
lossy WebP/JPEG fallback), cancelling retries, and failures that never reach a model (the calls
through a real endpoint are in tests/test_local_endpoint*.py and tests/test_client_jobs.py)."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import threading

import botocore.exceptions
import pytest
from PIL import Image
from sdserve.catalog import MAX_PAYLOAD_BYTES
from sdserve.wire import RequestTooLarge, encode_request

from studio.client import (
    EndpointConfig,
    StudioClient,
    describe_failure,
    parse_answer,
)
from studio.errors import JobCancelled, StudioError
from studio.metadata import read_parameters


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An image that barely compresses: worst case for the request size."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def inputs_of(body: bytes) -> dict[str, str]:
    payload = json.loads(body)
    for tensor in payload["inputs"]:
        assert tensor["shape"] == [1, 1] and tensor["datatype"] == "BYTES" and len(tensor["data"]) == 1
    return {tensor["name"]: tensor["data"][0] for tensor in payload["inputs"]}


def test_the_payload_is_the_articles_kserve_v2_json():
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    body = encode_request({"prompt": "a cat", "negative_prompt": "", "image": image},
                          {"num_inference_steps": 5, "seed": 3})
    values = inputs_of(body)
    assert values["prompt"] == "a cat" and values["negative_prompt"] == ""
    assert json.loads(values["gen_args"]) == {"num_inference_steps": 5, "seed": 3}
    png = base64.b64decode(values["image"])
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (64, 48)


def test_a_request_over_6_mb_as_png_is_sent_as_jpeg_and_the_mask_stays_png():
    image = noise((1600, 1600))
    mask = Image.new("L", (1600, 1600), 0)
    body = encode_request({"prompt": "x", "image": image, "mask_image": mask}, {})
    assert len(body) <= MAX_PAYLOAD_BYTES == 6 * 1024 * 1024
    values = inputs_of(body)
    assert base64.b64decode(values["image"]).startswith(b"\xff\xd8")  # JPEG
    assert base64.b64decode(values["mask_image"]).startswith(b"\x89PNG")
    as_png = io.BytesIO()
    image.save(as_png, format="PNG")
    assert len(as_png.getvalue()) * 4 / 3 > MAX_PAYLOAD_BYTES  # PNG alone would not have fit


def test_a_request_too_large_even_as_jpeg_is_refused_with_what_to_do():
    words = r"over the endpoint's 6 MB limit\. Make the image smaller \(it is 3000 px"
    with pytest.raises(RequestTooLarge, match=words):
        encode_request({"prompt": "x", "image": noise((3000, 2400))}, {})
    client = StudioClient(EndpointConfig(endpoint_name="sd-studio", endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StudioError, match=words):  # the client says it in the same words, sending nothing
        client.invoke("sd_depth", {"prompt": "x", "image": noise((3000, 2400))}, {})


def test_the_cap_is_6_mib_both_ways():
    """One limit, MAX_PAYLOAD_BYTES, for a request body and for an answer (sdserve.catalog)."""
    assert MAX_PAYLOAD_BYTES == 6 * 1024 * 1024 == 6_291_456


def encoded(image: Image.Image, image_format: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def test_lossy_answers_are_read_and_kept_as_png_with_their_parameters():
    """The server's fallback when a PNG would not fit one answer: WebP or JPEG, named in "encoding"."""
    image = noise((48, 32), seed=1)
    parameters = {"model": "sd_base", "seed": 5, "seeds": [5, 6], "encoding": "webp q90"}
    sent = [encoded(image, "WEBP", quality=90), encoded(image, "JPEG", quality=90)]
    answer = json.dumps({"outputs": [{"name": "generated_image", "data": sent},
                                     {"name": "parameters", "data": [json.dumps(parameters)]}]}).encode()
    result = parse_answer("sd_base", answer)
    assert [i.format for i in result.images] == ["WEBP", "JPEG"] and result.images[0].size == (48, 32)
    assert result.encoded == [base64.b64decode(data) for data in sent]  # as sent, kept
    for index, (png, decoded) in enumerate(zip(result.png, result.images)):
        assert png.startswith(b"\x89PNG")  # what the studio stores and downloads is a PNG...
        with Image.open(io.BytesIO(png)) as again:  # ...of exactly the pixels that came
            assert again.convert("RGB").tobytes() == decoded.convert("RGB").tobytes()
        assert read_parameters(png) == {**parameters, "seed": 5 + index}  # its own seed, and how it came
    assert result.parameters == parameters and result.seeds == [5, 6]


def test_a_png_answer_is_kept_byte_for_byte():
    png = base64.b64decode(encoded(noise((16, 16)), "PNG"))
    answer = json.dumps({"outputs": [{"name": "generated_image", "data": [base64.b64encode(png).decode()]}]}).encode()
    result = parse_answer("sd_base", answer)
    assert result.png == result.encoded == [png]


GIF = encoded(Image.new("P", (8, 8)), "GIF")


@pytest.mark.parametrize("answer", [b"not json", b"{}", b'{"outputs": [{"name": "generated_image", "data": ["!!"]}]}',
                                    json.dumps({"outputs": [{"name": "generated_image", "data": [GIF]}]}).encode()])
def test_an_unreadable_answer_is_a_studio_error(answer):
    with pytest.raises(StudioError, match="answer from sd_base could not be read"):
        parse_answer("sd_base", answer)


def test_an_endpoint_that_is_not_running_is_named():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    client = StudioClient(EndpointConfig(endpoint_name="sd-studio", endpoint_url=f"http://127.0.0.1:{port}",
                                         connect_timeout_s=2))
    with pytest.raises(StudioError, match=r"Cannot reach the endpoint. Is it running\?"):
        client.generate("a cat", num_inference_steps=2, width=64, height=64)


def test_configuration_from_the_environment(monkeypatch):
    monkeypatch.delenv("STUDIO_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("STUDIO_ENDPOINT_NAME", raising=False)
    assert EndpointConfig.from_env().endpoint_url == "http://127.0.0.1:8080"
    monkeypatch.setenv("STUDIO_ENDPOINT_NAME", "sd-prod")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    config = EndpointConfig.from_env()
    assert (config.endpoint_name, config.region, config.endpoint_url) == ("sd-prod", "eu-west-1", None)


def test_the_runtime_client_never_retries_by_itself():
    client = StudioClient(EndpointConfig(endpoint_name="sd-studio", endpoint_url="http://127.0.0.1:9"))
    retries = client.runtime.meta.config.retries
    assert retries["total_max_attempts"] == 1  # StudioClient.invoke does the retrying


class RecordedEvent(threading.Event):
    """A cancel event that records every wait on it: (the longest it would wait, whether it was set)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[float | None, bool]] = []

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        self.waits.append((timeout, woken))
        return woken


def test_a_cancel_stops_the_retries_of_a_call():
    class Loading:
        calls = 0

        def invoke_endpoint(self, **request):
            Loading.calls += 1
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "ModelNotReadyException", "Message": "loading"}}, "InvokeEndpoint")

    cancelled = RecordedEvent()
    config = EndpointConfig("sd-studio", endpoint_url="http://127.0.0.1:9", backoff_s=30)
    client = StudioClient(config, runtime=Loading())
    with pytest.raises(JobCancelled, match="while waiting to retry"):
        # The first failure's "Retrying in …" line is when the designer presses Cancel.
        client.invoke("sd_base", {"prompt": "a"}, {}, cancelled=cancelled,
                      on_status=lambda line: cancelled.set() if "Retrying" in line else None)
    # No back-off slept through: the one back-off (at least 15 s: 30 s x 0.5 to 1.5 jitter) was a
    # wait on the cancel, which the cancel ended, and no second call was sent.
    assert Loading.calls == 1
    assert [(backoff >= 15, woken) for backoff, woken in cancelled.waits] == [(True, True)], cancelled.waits


def test_a_connection_closed_mid_call_is_named():
    closed = botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:9")
    config = EndpointConfig(endpoint_name="sd-studio", endpoint_url="http://127.0.0.1:9")
    assert "closed the connection before answering" in str(describe_failure(closed, "sd_base", config))


def test_what_a_designer_reads_carries_no_account_arn_or_path():
    config = EndpointConfig(endpoint_name="secret-endpoint", region="eu-west-3")
    denied = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": "User: arn:aws:iam::123456789012:user/studio is not "
                   "authorized to perform: sagemaker:InvokeEndpoint on resource: arn:aws:sagemaker:eu-west-3:"
                   "123456789012:endpoint/secret-endpoint"}}, "InvokeEndpoint")
    model_failure = botocore.exceptions.ClientError(
        {"Error": {"Code": "ModelError", "Message": "x"}, "OriginalStatusCode": 400,
         "OriginalMessage": '{"error": "failed to load /opt/ml/models/abc/model/1/model.py for account 123456789012"}'},
        "InvokeEndpoint")
    timeout = botocore.exceptions.ReadTimeoutError(endpoint_url="https://runtime.sagemaker.eu-west-3.amazonaws.com")
    stopped = botocore.exceptions.ClientError(
        {"Error": {"Code": "InternalFailure", "Message": "The model server stopped while running sd_base.tar.gz; "
                   "its log is /opt/ml/logs/triton.log"}}, "InvokeEndpoint")
    for error in (denied, model_failure, timeout, stopped):
        message = str(describe_failure(error, "sd_base", config))
        for secret in ("123456789012", "arn:aws", "/opt/ml", "secret-endpoint", "eu-west-3"):
            assert secret not in message, message
    assert "AccessDeniedException" in str(describe_failure(denied, "sd_base", config))
    assert "<path>" in str(describe_failure(model_failure, "sd_base", config))
    assert "The model server stopped while running sd_base.tar.gz" in str(describe_failure(stopped, "sd_base", config))


def test_the_deploy_smoke_test_speaks_the_same_wire_without_the_studio(tmp_path, monkeypatch, capsys):
    """deploy.invoke sends each model its sample call through boto3 in sdserve.wire's format (the
    studio's client's own), sends it again while the model loads, and writes what comes back."""
    import ast
    from pathlib import Path

    from deploy import invoke
    from deploy.config import DeployConfig
    from sdserve.images import encode_png

    class Runtime:
        def __init__(self):
            self.requests = []

        def invoke_endpoint(self, **request):
            self.requests.append(request)
            if len(self.requests) == 1:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "ModelNotReadyException", "Message": "loading"}}, "InvokeEndpoint")
            size = json.loads(inputs_of(request["Body"])["gen_args"]).get("width", 64)
            image = encode_png(Image.new("RGB", (size, size)), {"parameters": json.dumps({"seed": 4})}).decode()
            answer = {"outputs": [{"name": "generated_image", "data": [image]}, {"name": "parameters", "data": ['{"seed": 4}']}]}
            return {"Body": io.BytesIO(json.dumps(answer).encode())}

    monkeypatch.setattr(invoke, "LOADING_BACKOFF_S", 0)
    runtime = Runtime()
    config = DeployConfig(models=("sd_base", "sd_inpaint"))
    assert invoke.smoke_test(config, tmp_path, steps=2, seed=4, runtime=runtime)
    generate, _, inpaint = runtime.requests  # the first sent twice: still loading the first time
    assert generate["TargetModel"] == "sd_base.tar.gz" and generate["EndpointName"] == config.endpoint_name
    values = inputs_of(inpaint["Body"])
    assert set(values) == {"prompt", "negative_prompt", "image", "mask_image", "gen_args"}
    assert json.loads(values["gen_args"]) == {"num_inference_steps": 2, "seed": 4}
    assert Image.open(tmp_path / "sd_base-0.png").size == (512, 512) and (tmp_path / "sd_inpaint-0.png").is_file()
    source = (Path(invoke.__file__)).read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("studio") for name in imported if name), "deploy never imports the studio"
