"""The serving image: the SDK lookup of the base image, content tags, and `up` finding the
extended image in ECR (moto server). The SDK itself lives outside the project environment, so
most tests use a stand-in `sagemaker.core.image_uris` module; one test uses the real SDK when
build/sagemaker-sdk exists."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from deploy import image
from serving.archive import REPO_ROOT
from deploy.aws import DeployError
from deploy.config import DeployConfig
from tests.deploy_support import (
    BUCKET,
    REGION,
    ROLE,
    aws_client,
)


STAND_IN = '''
def retrieve(framework, region, version, instance_type, **_):
    if version == "0.0":
        raise ValueError("Unsupported sagemaker-tritonserver version: 0.0.\\n Supported: 25.04")
    gpu = instance_type.startswith(("ml.g", "ml.p"))
    return f"763104351884.dkr.ecr.{region}.amazonaws.com/{framework}:{version}-py3{'' if gpu else '-cpu'}"
'''


@pytest.fixture
def stand_in_sdk(tmp_path, monkeypatch) -> Path:
    package = tmp_path / "fake-sdk" / "sagemaker" / "core"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "image_uris.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fake-sdk"))
    return Path(sys.executable)


@pytest.mark.process
def test_base_image_comes_from_the_sdk_with_our_arguments(stand_in_sdk):
    cfg = DeployConfig(region="eu-west-1", sdk_python=stand_in_sdk)
    assert image.base_image_uri(cfg) == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/sagemaker-tritonserver:25.04-py3"
    cpu = DeployConfig(region="eu-west-1", instance_type="ml.c5.xlarge", triton_version="24.09", sdk_python=stand_in_sdk)
    assert image.base_image_uri(cpu).endswith(":24.09-py3-cpu")


@pytest.mark.process
def test_sdk_refusal_is_one_clear_line(stand_in_sdk):
    cfg = DeployConfig(region=REGION, triton_version="0.0", sdk_python=stand_in_sdk)
    with pytest.raises(DeployError, match=r"could not resolve the Triton 0.0 image .*ValueError: Unsupported .* Supported: 25.04$"):
        image.base_image_uri(cfg)


def test_no_sdk_means_no_plan_lookup_and_no_install(tmp_path, monkeypatch):
    monkeypatch.setattr(image.importlib.util, "find_spec", lambda name: None)
    cfg = DeployConfig(region=REGION, build_dir=tmp_path / "build")
    assert image.base_image_uri(cfg, create_sdk_env=False) is None
    assert not (tmp_path / "build").exists()


def test_image_tag_follows_content_not_region(tmp_path, monkeypatch):
    context = tmp_path / "triton_image"
    shutil.copytree(image.IMAGE_CONTEXT, context)
    monkeypatch.setattr(image, "IMAGE_CONTEXT", context)
    east = "763104351884.dkr.ecr.us-east-1.amazonaws.com/sagemaker-tritonserver:25.04-py3"
    tag = image.image_tag(east)
    assert tag.startswith("25.04-py3-") and tag == image.image_tag(east.replace("us-east-1", "eu-west-1"))
    assert image.image_tag(east.replace("25.04", "25.09")) != tag
    (context / "requirements.txt").write_text((context / "requirements.txt").read_text() + "xformers==0.0.35\n")
    assert image.image_tag(east) != tag


@pytest.mark.aws
@pytest.mark.process
def test_up_uses_the_extended_image_from_ecr(deploy, moto, stand_in_sdk, repository):
    settings = ("--region", REGION, "--bucket", BUCKET, "--role-arn", ROLE, "--repository", str(repository),
                "--instance-type", "ml.g4dn.2xlarge", "--poll-seconds", "0.01", "--sdk-python", str(stand_in_sdk))
    aws_client(moto, "s3").create_bucket(Bucket=BUCKET)
    code, _, err = deploy("up", *settings)
    assert code == 1 and "no image sd-studio-triton:25.04-py3-" in err and "package --image" in err
    assert aws_client(moto, "sagemaker").list_models()["Models"] == []

    ecr = aws_client(moto, "ecr")
    uri = ecr.create_repository(repositoryName="sd-studio-triton")["repository"]["repositoryUri"]
    tag = image.image_tag(f"763104351884.dkr.ecr.{REGION}.amazonaws.com/sagemaker-tritonserver:25.04-py3")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"digest": "sha256:" + "0" * 64, "size": 1, "mediaType": "application/vnd.docker.container.image.v1+json"},
                "layers": []}
    ecr.put_image(repositoryName="sd-studio-triton", imageManifest=json.dumps(manifest), imageTag=tag)
    code, out, err = deploy("up", *settings)
    assert code == 0, out + err
    (model,) = aws_client(moto, "sagemaker").list_models()["Models"]
    container = aws_client(moto, "sagemaker").describe_model(ModelName=model["ModelName"])["PrimaryContainer"]
    assert container["Image"] == f"{uri}:{tag}"


SDK_ENV_PYTHON = REPO_ROOT / "build" / "sagemaker-sdk" / "bin" / "python"


@pytest.mark.process
@pytest.mark.skipif(not SDK_ENV_PYTHON.exists(), reason="no build/sagemaker-sdk (made by the first `up` or `package --image`)")
def test_the_real_sdk_resolves_the_triton_image():
    cfg = DeployConfig(region="eu-west-1", sdk_python=SDK_ENV_PYTHON)
    assert image.base_image_uri(cfg).endswith(".dkr.ecr.eu-west-1.amazonaws.com/sagemaker-tritonserver:25.04-py3")
