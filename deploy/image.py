"""The serving container: the SageMaker Triton image for the region, and our extension of it.

The base image URI comes from the sagemaker SDK (`image_uris.retrieve`, which reads the JSON
tables bundled with the SDK), never from a table of ours. The SDK cannot live in the project
environment (it pins importlib-metadata<7; nvidia-pytriton needs >=7.0.1), so it runs in its own
interpreter: this one when it has the SDK, `sdk_python` when set, else build/sagemaker-sdk, a
virtual environment made from deploy/sdk-requirements.txt on first use.

The extended image (deploy/triton_image) adds diffusers & co. It is built FROM the base image by
digest (the `triton_image_digest` setting), tagged by content, from the base image reference and
the Dockerfile and lock, so `up` finds the image `package --image` pushed without any state kept
between the two, and serves it by the digest ECR reports for that tag.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from deploy.aws import Aws, Call, DeployError, redact
from deploy.config import DeployConfig, check_base_image_digest

HERE = Path(__file__).resolve().parent
IMAGE_CONTEXT = HERE / "triton_image"
SDK_REQUIREMENTS = HERE / "sdk-requirements.txt"
TRITON_FRAMEWORK = "sagemaker-tritonserver"
IMAGE_URI_PATTERN = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[\w./-]+:[\w.-]+$")
# Runs in the SDK's interpreter: SDK v3 (sagemaker-core) first, then v2. Prints the URI last, or
# the SDK's complaint as one line on stderr (v2 would print its traceback on stdout).
RETRIEVE = """
import sys
try:
    from sagemaker.core import image_uris
except ImportError:
    from sagemaker import image_uris
framework, region, version, instance_type = sys.argv[1:]
try:
    print(image_uris.retrieve(framework=framework, region=region, version=version, instance_type=instance_type))
except Exception as error:
    sys.exit(f"{type(error).__name__}: {' '.join(str(error).split())}")
"""


# --- the base image, from the SDK --------------------------------------------------------------


def sdk_python(cfg: DeployConfig, *, create: bool) -> Path | None:
    """An interpreter that can import the sagemaker SDK; None when there is none and not `create`."""
    if cfg.sdk_python is not None:
        return cfg.sdk_python
    if importlib.util.find_spec("sagemaker") is not None:
        return Path(sys.executable)
    python = cfg.build_dir / "sagemaker-sdk" / "bin" / "python"
    if python.exists() or not create:
        return python if python.exists() else None
    print(f"Creating {python.parent.parent} for the sagemaker SDK (once; it cannot share the project "
          "environment: importlib-metadata<7 vs nvidia-pytriton's >=7.0.1)")
    subprocess.run([sys.executable, "-m", "venv", str(python.parent.parent)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(SDK_REQUIREMENTS)], check=True)
    return python


def base_image_uri(cfg: DeployConfig, *, create_sdk_env: bool = True) -> str | None:
    """The SageMaker Triton image for the region, version and instance type (-cpu for CPU types)."""
    python = sdk_python(cfg, create=create_sdk_env)
    if python is None:
        return None
    result = subprocess.run(
        [str(python), "-c", RETRIEVE, TRITON_FRAMEWORK, cfg.region, cfg.triton_version, cfg.instance_type],
        capture_output=True, text=True, env={**os.environ, "SAGEMAKER_SUPPRESS_V2_WARNING": "1"},
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not IMAGE_URI_PATTERN.match(lines[-1]):
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeployError(
            f"the sagemaker SDK ({python}) could not resolve the Triton {cfg.triton_version} image for "
            f"{cfg.region} / {cfg.instance_type}: {reason}"
        )
    return lines[-1]


def pinned_base_image(cfg: DeployConfig, base_image: str) -> str:
    """`<uri>:<tag>@<digest>` (docker pulls the digest; the tag stays for people), or the bare URI
    where no digest is set (`package --image` allows that only with --allow-unpinned-images)."""
    return f"{base_image}@{cfg.triton_image_digest}" if cfg.triton_image_digest else base_image


# --- the extended image ----------------------------------------------------------------------


def image_tag(base_image: str) -> str:
    """`<base tag>-<hash>`: the same base (its digest included), Dockerfile and lock give the same tag."""
    digest = hashlib.sha256(base_image.split("/", 1)[-1].encode())  # the registry differs per region
    for path in sorted(IMAGE_CONTEXT.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{base_image.split('@', 1)[0].rsplit(':', 1)[-1]}-{digest.hexdigest()[:12]}"


def describe_repository(cfg: DeployConfig) -> Call:
    return Call("ecr", "describe_repositories", {"repositoryNames": [cfg.ecr_repository]})


def create_repository(cfg: DeployConfig) -> Call:
    # Tags are content hashes, so a tag never needs to move: immutable tags guard against that.
    return Call("ecr", "create_repository", {
        "repositoryName": cfg.ecr_repository,
        "imageTagMutability": "IMMUTABLE",
        "imageScanningConfiguration": {"scanOnPush": True},
    }, "when the repository does not exist")


def describe_image(cfg: DeployConfig, tag: str) -> Call:
    return Call("ecr", "describe_images", {"repositoryName": cfg.ecr_repository, "imageIds": [{"imageTag": tag}]},
                "is the image with this tag pushed already?")


def authorization_token() -> Call:
    return Call("ecr", "get_authorization_token", {}, "for `docker login` (password passed on stdin)")


def planned_build(cfg: DeployConfig) -> list[Call]:
    tag = "<base tag>-<hash of Dockerfile + requirements>"
    return [describe_repository(cfg), create_repository(cfg), describe_image(cfg, tag), authorization_token()]


def planned_lookup(cfg: DeployConfig) -> list[Call]:
    return [describe_repository(cfg), describe_image(cfg, "<base tag>-<hash of Dockerfile + requirements>")]


def require_docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise DeployError(
            "`package --image` needs the docker CLI, which is not on PATH: install Docker, or build "
            "deploy/triton_image elsewhere and pass its URI to `up --image-uri`"
        )
    return docker


def build_and_push(cfg: DeployConfig, aws: Aws, *, allow_unpinned: bool = False) -> str:
    """Build deploy/triton_image on the SDK's base image, by digest, and push it to ECR; returns its URI."""
    check_base_image_digest(cfg, allow_unpinned=allow_unpinned)
    docker = require_docker()
    base = pinned_base_image(cfg, base_image_uri(cfg))
    tag = image_tag(base)
    repository = aws.read(describe_repository(cfg)) or aws.run(create_repository(cfg))
    uri = f"{_repository_uri(repository)}:{tag}"
    if aws.read(describe_image(cfg, tag)) is not None:
        print(redact(f"image {uri} already in ECR, skipped"))
        return uri
    auth = aws.run(authorization_token(), echo=False)["authorizationData"][0]
    user, password = base64.b64decode(auth["authorizationToken"]).decode().split(":", 1)
    for registry in sorted({base.split("/", 1)[0], uri.split("/", 1)[0]}):
        _docker(docker, "login", "--username", user, "--password-stdin", registry, stdin=password)
    _docker(docker, "build", "--build-arg", f"BASE_IMAGE={base}", "--tag", uri, str(IMAGE_CONTEXT))
    _docker(docker, "push", uri)
    print(redact(f"pushed {uri}"))
    return uri


def extended_image_uri(cfg: DeployConfig, aws: Aws) -> str:
    """The image `package --image` pushed for this configuration, by the digest ECR reports for its tag."""
    tag = image_tag(pinned_base_image(cfg, base_image_uri(cfg)))
    repository = aws.read(describe_repository(cfg))
    described = None if repository is None else aws.read(describe_image(cfg, tag))
    if described is None:
        raise DeployError(
            f"no image {cfg.ecr_repository}:{tag} in ECR: run `python -m deploy package --image` (needs docker), "
            "or pass a prebuilt image with --image-uri"
        )
    return f"{_repository_uri(repository)}@{described['imageDetails'][0]['imageDigest']}"


def _repository_uri(described: dict) -> str:
    # describe_repositories answers a list, create_repository a single repository.
    repository = described["repositories"][0] if "repositories" in described else described["repository"]
    return repository["repositoryUri"]


def _docker(docker: str, *args: str, stdin: str | None = None) -> None:
    # Never the password, which goes through stdin; the registry host holds the account id.
    print(redact(f"  docker {' '.join(args)}"))
    result = subprocess.run([docker, *args], input=stdin, text=True)
    if result.returncode != 0:
        raise DeployError(f"`docker {args[0]}` failed with exit code {result.returncode}")
