"""The local endpoint with its model store on S3: moto in server mode on 127.0.0.1, real boto3
on both sides (the endpoint downloads with boto3's S3 client, the test invokes with
sagemaker-runtime)."""

from __future__ import annotations

import logging
import os

import boto3
import pytest
from moto.server import ThreadedMotoServer

from serving.archive import archive_name
from studio.client import EndpointConfig, StudioClient

from .endpoint_support import (
    ENDPOINT_NAME,
    SIZE,
    STEPS,
    evil_archive,
    invoke,
    listing,
    model_info,
    runtime_client,
    scene,
    start_endpoint,
)

pytestmark = [pytest.mark.triton, pytest.mark.aws]

BUCKET = "sd-studio-local-endpoint-test"
PREFIX = "mme/models"


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    saved = {name: os.environ.get(name) for name in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_REGION")}
    empty = tmp_path_factory.mktemp("no-aws-config")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_CONFIG_FILE=str(empty / "config"), AWS_SHARED_CREDENTIALS_FILE=str(empty / "credentials"),
                      AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        os.environ.pop(name, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    try:
        yield url, s3
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def endpoint(moto_s3, archive_store, tmp_path_factory, artifacts_dir):
    url, s3 = moto_s3
    s3.upload_file(str(archive_store / archive_name("sd_base")), BUCKET, f"{PREFIX}/sd_base.tar.gz")
    tmp = tmp_path_factory.mktemp("local-endpoint-s3")
    server = start_endpoint(f"s3://{BUCKET}/{PREFIX}/", tmp, artifacts_dir, "local-endpoint-s3",
                            s3_endpoint_url=url, max_archive_gb=0.05)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def runtime(endpoint):
    return runtime_client(endpoint.url)


def test_a_model_from_the_s3_prefix_through_the_client_layer(endpoint):
    client = StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url))
    result = client.generate("a castle", num_inference_steps=STEPS, width=SIZE, height=SIZE, seed=5)
    assert result.images[0].size == (SIZE, SIZE) and result.parameters["model"] == "sd_base"
    assert listing(endpoint)["model_store"] == f"s3://{BUCKET}/{PREFIX}/"
    assert model_info(endpoint, "sd_base.tar.gz")["state"] == "loaded"
    assert not list(endpoint.cache.downloads.iterdir())  # the download was removed after extraction


def test_unknown_target_model_on_s3(endpoint, runtime):
    with pytest.raises(runtime.exceptions.ValidationError) as caught:
        invoke(runtime, "sd_missing.tar.gz")
    message = caught.value.response["Error"]["Message"]
    assert f"s3://{BUCKET}/{PREFIX}/" in message and "sd_missing.tar.gz" in message


def test_an_archive_uploaded_later_becomes_invokable(endpoint, runtime, moto_s3, archive_store):
    _, s3 = moto_s3
    with pytest.raises(runtime.exceptions.ValidationError):
        invoke(runtime, "later/sd_depth.tar.gz")
    s3.upload_file(str(archive_store / archive_name("sd_depth")), BUCKET, f"{PREFIX}/later/sd_depth.tar.gz")
    client = StudioClient(EndpointConfig(endpoint_name=ENDPOINT_NAME, endpoint_url=endpoint.url))
    result = client.invoke("later/sd_depth", {"prompt": "a watercolour", "image": scene()},
                           {"num_inference_steps": STEPS, "seed": 2})
    assert result.images[0].size == (SIZE, SIZE) and result.parameters["model"] == "sd_depth"


def test_corrupt_and_escaping_archives_on_s3_are_refused(endpoint, runtime, moto_s3, tmp_path):
    _, s3 = moto_s3
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/corrupt.tar.gz", Body=b"\x1f\x8b" + os.urandom(2000))
    with pytest.raises(runtime.exceptions.ValidationError, match="valid tar.gz archive"):
        invoke(runtime, "corrupt.tar.gz")

    outside = tmp_path / "outside" / "pwned.txt"
    outside.parent.mkdir()
    evil = evil_archive(tmp_path / "evil.tar.gz", "dot-dot", outside)
    s3.upload_file(str(evil), BUCKET, f"{PREFIX}/evil.tar.gz")
    with pytest.raises(runtime.exceptions.ValidationError, match="'..' in path"):
        invoke(runtime, "evil.tar.gz")
    assert list(outside.parent.iterdir()) == []
    assert not list(endpoint.cache.downloads.iterdir())
    assert not [p for p in endpoint.cache.models.iterdir() if p.name.startswith(("corrupt", "evil"))]
