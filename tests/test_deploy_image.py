"""The serving image: the SDK lookup of the base image, content tags, and `up` finding the
extended image in ECR (moto server). The SDK itself lives outside the project environment, so
most tests use a stand-in `sagemaker.core.image_uris` module; one test uses the real SDK when
build/sagemaker-sdk exists."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy import image, image_lock
from serving.archive import REPO_ROOT
from deploy.aws import DeployError
from deploy.config import DeployConfig
from tests.deploy_support import (
    BUCKET,
    REGION,
    ROLE,
    aws_client,
)


BASE_DIGEST = "sha256:" + "a" * 64

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


def test_the_base_image_is_built_on_by_digest():
    base = "763104351884.dkr.ecr.us-east-1.amazonaws.com/sagemaker-tritonserver:25.04-py3"
    pinned = image.pinned_base_image(DeployConfig(triton_image_digest=BASE_DIGEST), base)
    assert pinned == f"{base}@{BASE_DIGEST}"
    assert image.pinned_base_image(DeployConfig(), base) == base  # only with --allow-unpinned-images
    tag = image.image_tag(pinned)
    assert tag.startswith("25.04-py3-"), "the readable part is the base's tag, not its digest"
    assert tag != image.image_tag(base) != image.image_tag(pinned.replace(BASE_DIGEST, "sha256:" + "b" * 64))


def test_the_dockerfile_installs_the_hashed_lock_on_the_given_base():
    instructions = [line.split(None, 1) for line in (image.IMAGE_CONTEXT / "Dockerfile").read_text().splitlines()
                    if line and not line.startswith((" ", "#"))]
    assert ["FROM", "${BASE_IMAGE}"] in instructions
    installs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert "python3 -m pip install --require-hashes --only-binary=:all: -r /opt/sd-studio/requirements.lock" in installs
    assert ["COPY", "requirements.lock /opt/sd-studio/requirements.lock"] in instructions
    assert not any("requirements.txt" in rest for _, rest in instructions), "the unhashed list is never installed"


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """{name: (requirement, [sha256, ...])} of the serving image's lock; continuation lines joined."""
    text = image_lock.LOCK.read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, *hashes = line.split("--hash=")
            entries[canonicalize_name(Requirement(requirement).name)] = (requirement.strip(), [h.strip() for h in hashes])
    return entries


def test_every_line_of_the_image_lock_is_an_exact_pin_with_sha256_hashes():
    for line in image_lock.LOCK.read_text().splitlines():  # a pin, a hash of it, or a comment
        assert line.startswith("#") or re.fullmatch(
            r'[a-z0-9._-]+==[A-Za-z0-9.+!-]+( ; python_version == "3\.\d+"( or python_version == "3\.\d+")*)? \\'
            r'|    --hash=sha256:[0-9a-f]{64}( \\)?', line), line
    entries = lock_entries()
    assert len(entries) > len(image_lock.requirement_lines(image_lock.REQUIREMENTS)), "the closure, not only the pins"
    for name, (requirement, hashes) in entries.items():
        assert Requirement(requirement).specifier and str(Requirement(requirement).specifier).startswith("=="), name
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{name}: no sha256"


def test_the_image_lock_pins_what_its_requirements_pin_and_no_torch():
    entries = lock_entries()
    for line in image_lock.requirement_lines(image_lock.REQUIREMENTS):
        pin = Requirement(line)
        name = canonicalize_name(pin.name)
        assert name in entries, f"{name} is missing from the lock: run `python -m deploy.image_lock`"
        assert Requirement(entries[name][0]).specifier == pin.specifier, f"{name}: run `python -m deploy.image_lock`"
    assert not set(entries) & {"torch", "triton", "nvidia-cublas-cu12", "sympy"}, "torch comes from PyTorch's index"


def report_item(name: str, version: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "download_info": {"archive_info": {"hashes": {"sha256": f"{name}-{version}".encode().hex()[:64].ljust(64, "0")}}}}


def test_the_lock_holds_what_the_pins_need_on_each_python_and_nothing_of_torch():
    report = {"install": [
        report_item("diffusers", "1.0", "numpy", "filelock", 'pytest; extra == "test"'),
        report_item("accelerate", "2.0", "torch>=2", "numpy"),
        report_item("numpy", "1.26.4"),
        report_item("filelock", "3.0", 'tomli; python_version < "3.12"'),
        report_item("tomli", "2.0"),
        report_item("torch", "2.14", "filelock", "sympy"),
        report_item("sympy", "1.14"),
    ]}
    on_312 = image_lock.closure(report, ["diffusers==1.0", "accelerate==2.0"], "3.12")
    assert set(on_312) == {"diffusers", "accelerate", "numpy", "filelock"}, "no torch, sympy, test extra or tomli"
    on_311 = image_lock.closure(report, ["diffusers==1.0", "accelerate==2.0"], "3.11")
    assert set(on_311) == set(on_312) | {"tomli"}
    text = image_lock.lock_text({"3.12": on_312, "3.11": on_311})
    assert 'tomli==2.0 ; python_version == "3.11" \\\n' in text and "numpy==1.26.4 \\\n" in text
    with pytest.raises(ValueError, match="numpy: 1.26.4 for one Python, 2.0 for 3.11"):
        image_lock.lock_text({"3.12": on_312, "3.11": {**on_311, "numpy": ("2.0", "0" * 64)}})


@pytest.mark.aws
@pytest.mark.process
def test_up_uses_the_extended_image_from_ecr(deploy, moto, stand_in_sdk, repository):
    settings = ("--region", REGION, "--bucket", BUCKET, "--role-arn", ROLE, "--repository", str(repository),
                "--instance-type", "ml.g4dn.2xlarge", "--poll-seconds", "0.01", "--sdk-python", str(stand_in_sdk),
                "--triton-image-digest", BASE_DIGEST)
    aws_client(moto, "s3").create_bucket(Bucket=BUCKET)
    code, _, err = deploy("up", *settings)
    assert code == 1 and "no image sd-studio-triton:25.04-py3-" in err and "package --image" in err
    assert aws_client(moto, "sagemaker").list_models()["Models"] == []

    ecr = aws_client(moto, "ecr")
    uri = ecr.create_repository(repositoryName="sd-studio-triton")["repository"]["repositoryUri"]
    tag = image.image_tag(f"763104351884.dkr.ecr.{REGION}.amazonaws.com/sagemaker-tritonserver:25.04-py3@{BASE_DIGEST}")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"digest": "sha256:" + "0" * 64, "size": 1, "mediaType": "application/vnd.docker.container.image.v1+json"},
                "layers": []}
    pushed = ecr.put_image(repositoryName="sd-studio-triton", imageManifest=json.dumps(manifest), imageTag=tag)
    code, out, err = deploy("up", *settings)
    assert code == 0, out + err
    (model,) = aws_client(moto, "sagemaker").list_models()["Models"]
    container = aws_client(moto, "sagemaker").describe_model(ModelName=model["ModelName"])["PrimaryContainer"]
    # Served by digest: the tag found it, the digest is what SageMaker pulls.
    assert container["Image"] == f"{uri}@{pushed['image']['imageId']['imageDigest']}"


SDK_ENV_PYTHON = REPO_ROOT / "build" / "sagemaker-sdk" / "bin" / "python"


@pytest.mark.process
@pytest.mark.skipif(not SDK_ENV_PYTHON.exists(), reason="no build/sagemaker-sdk (made by the first `up` or `package --image`)")
def test_the_real_sdk_resolves_the_triton_image():
    cfg = DeployConfig(region="eu-west-1", sdk_python=SDK_ENV_PYTHON)
    assert image.base_image_uri(cfg).endswith(".dkr.ecr.eu-west-1.amazonaws.com/sagemaker-tritonserver:25.04-py3")
