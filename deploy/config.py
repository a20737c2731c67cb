"""Deployment configuration: one dataclass, filled from flags > environment > config file > defaults.

Every setting has the same three spellings, derived from its field name (`instance_count`):
the flag `--instance-count`, the variable `SD_DEPLOY_INSTANCE_COUNT` and the key
`instance_count` in the TOML config file (`--config PATH`, `SD_DEPLOY_CONFIG`, or `deploy.toml`
in the working directory when present). All AWS resource names derive from `project`.

Validation here never calls AWS: commands validate first, so a bad setting stops them before
their first request.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from serving.archive import REPO_ROOT, archive_name
from sdserve.checkpoint import has_checkpoint
from sdserve.catalog import MODELS
from sdserve.instances import DEFAULT_INSTANCE_TYPE, INSTANCE_TYPES

ENV_PREFIX = "SD_DEPLOY_"
CONFIG_ENV = "SD_DEPLOY_CONFIG"
DEFAULT_CONFIG_FILE = Path("deploy.toml")
VARIANT_NAME = "AllTraffic"
# Derived names add at most 18 characters ("-config-" + a 10-digit hash) to the project, and
# SageMaker names stop at 63.
PROJECT_PATTERN = re.compile(r"^[a-z0-9](-?[a-z0-9])*$")
PROJECT_MAX = 40
ROLE_ARN_PATTERN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
# Images are named by digest: a tag can be moved to other contents (AWS moves the Triton image's
# tags when it patches them), a digest cannot. `--allow-unpinned-images` is the way around.
DIGEST_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")
PINNED_IMAGE_PATTERN = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")
UNPINNED_FLAG = "--allow-unpinned-images"
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# The archives' S3 prefix ends up in every archive key, the endpoint's ModelDataUrl and the IAM
# policies' resource ARNs, so it is kept to plain relative path segments: nothing that S3, an IAM
# wildcard or a shell could read another way ('..', '*', '//', backslashes, control characters).
PREFIX_CHARACTER = re.compile(r"[A-Za-z0-9._-]")
PREFIX_MAX = 256  # S3 keys and ModelDataUrl stop at 1024; this leaves room for bucket and archive names
PREFIX_RULE = (
    "one or more segments of letters, digits, '.', '_' and '-' joined by single '/', relative "
    f"(no leading '/'), no '.' or '..' segment, at most {PREFIX_MAX} characters"
)
WEIGHTS_HINT = "run `python -m deploy weights --tiny` (test weights) or `python -m deploy weights --hub` (real ones)"


class ConfigError(ValueError):
    """A setting is missing or wrong; the message says which and how to set it."""


def _setting(default: Any, help: str, *, keep_blank: bool = False, **kwargs: Any) -> Any:
    """A setting; a blank value (`VAR=`, `--flag ""`) means "not set" unless `keep_blank`."""
    return field(default=default, metadata={"help": help, "keep_blank": keep_blank}, **kwargs)


@dataclass(frozen=True)
class DeployConfig:
    project: str = _setting("sd-studio", "project name every AWS resource name derives from")
    region: str | None = _setting(None, "AWS region (default: boto3's, from AWS_REGION / AWS_DEFAULT_REGION / profile)")
    bucket: str | None = _setting(None, "S3 bucket holding the model archives")
    # keep_blank: an empty prefix would mean the bucket's root, so it is refused, never taken for
    # "use the default".
    prefix: str | None = _setting(None, "S3 prefix of the archives, the endpoint's ModelDataUrl (default: <project>/models)",
                                  keep_blank=True)
    role_arn: str | None = _setting(None, "SageMaker execution role ARN (S3 read on the prefix, ECR pull, logs)")
    results_bucket: str | None = _setting(
        None, "S3 bucket the studio keeps results in (its --results-bucket); with it, `policy studio` allows the "
              "studio's reads and writes under the results prefix")
    # keep_blank: as for `prefix`, an empty one would be the bucket's root.
    results_prefix: str | None = _setting(
        None, "S3 prefix of the studio's results (its --results-prefix; default: <project>/results)", keep_blank=True)
    # The types offered, with their prices, are sdserve.instances' table (the studio prices images with it).
    instance_type: str = _setting(DEFAULT_INSTANCE_TYPE, "endpoint instance type, one of " + ", ".join(INSTANCE_TYPES)
                                  + " (a GPU family for the KIND_GPU configs)")
    instance_count: int = _setting(1, "initial instance count (2+ recommended for availability)")
    triton_version: str = _setting("25.04", "SageMaker Triton container version, resolved by the sagemaker SDK")
    triton_image_digest: str | None = _setting(
        None, "sha256:<64 hex> digest of the SageMaker Triton image `package --image` builds on, for this "
              "region, version and instance kind (docs/deploy.md: reading it)")
    image_uri: str | None = _setting(None, "prebuilt container image by digest (<registry>/<repository>@sha256:<64 hex>); "
                                           "default: the extended image `package --image` pushes")
    models: tuple[str, ...] = _setting(tuple(MODELS), "models to package, upload and smoke-test")
    repository: Path = _setting(REPO_ROOT / "serving" / "models", "Triton model repository")
    build_dir: Path = _setting(REPO_ROOT / "build", "where archives (build/model-store) and the SDK environment go")
    shm_default_bytes: int = _setting(64 << 20, "Python backend shared memory per model (large image tensors)")
    shm_growth_bytes: int = _setting(16 << 20, "Python backend shared memory growth step")
    autoscale_min: int | None = _setting(None, "autoscaling: minimum instances (set with --autoscale-max to enable)")
    autoscale_max: int | None = _setting(None, "autoscaling: maximum instances")
    autoscale_target: float = _setting(5.0, "autoscaling: target invocations per instance per minute")
    aws_endpoint_url: str | None = _setting(None, "send every AWS call to this URL (a local moto server, for tests)")
    poll_seconds: float = _setting(20.0, "seconds between endpoint status polls")
    wait_timeout_seconds: float = _setting(3600.0, "give up waiting for the endpoint after this many seconds")
    sdk_python: Path | None = _setting(None, "interpreter with the sagemaker SDK (default: this one if it has it, "
                                             "else build/sagemaker-sdk, made on first use)")

    # --- derived names ------------------------------------------------------------------------

    @property
    def endpoint_name(self) -> str:
        return self.project

    @property
    def s3_prefix(self) -> str:
        # One trailing "/" is tolerated ("a/b/" is "a/b"); anything else odd is refused by check_prefix.
        return f"{self.project}/models" if self.prefix is None else self.prefix.removesuffix("/")

    @property
    def s3_results_prefix(self) -> str:
        return f"{self.project}/results" if self.results_prefix is None else self.results_prefix.strip("/")

    @property
    def model_data_url(self) -> str:
        return f"s3://{self.bucket}/{self.s3_prefix}/"

    def archive_key(self, model: str) -> str:
        return f"{self.s3_prefix}/{archive_name(model)}"

    @property
    def archive_keys(self) -> tuple[str, ...]:
        """The keys `package` uploads for this configuration's models: all that `down` may delete."""
        return tuple(self.archive_key(model) for model in self.models)

    @property
    def archive_dir(self) -> Path:
        return self.build_dir / "model-store"

    @property
    def ecr_repository(self) -> str:
        return f"{self.project}-triton"

    @property
    def scaling_resource_id(self) -> str:
        return f"endpoint/{self.endpoint_name}/variant/{VARIANT_NAME}"

    @property
    def scaling_policy_name(self) -> str:
        return f"{self.project}-invocations-per-instance"

    @property
    def autoscaling(self) -> bool:
        return self.autoscale_max is not None

    @property
    def gpu_instance(self) -> bool:
        instance = INSTANCE_TYPES.get(self.instance_type)
        return instance.gpu is not None if instance else self.instance_type.startswith(("ml.g", "ml.p"))


SETTINGS = {f.name: f for f in dataclasses.fields(DeployConfig)}
HINTS = typing.get_type_hints(DeployConfig)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per setting; absent flags stay out of the namespace so lower layers show through."""
    group = parser.add_argument_group(
        "configuration", f"each also from ${ENV_PREFIX}<NAME> or a key in the TOML config file; "
        "precedence: flag > environment > file > default",
    )
    group.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                       help=f"TOML config file (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG_FILE} when present)")
    for name, setting in SETTINGS.items():
        group.add_argument(
            flag(name), dest=name, default=argparse.SUPPRESS, nargs="+" if _kind(name) is tuple else None,
            help=f"{setting.metadata['help']} (default: {_show_default(setting)})",
        )


def load_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> DeployConfig:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None) or environ.get(CONFIG_ENV)
    if config_file is not None:
        values.update(_read_file(Path(config_file)))
    elif DEFAULT_CONFIG_FILE.is_file():
        values.update(_read_file(DEFAULT_CONFIG_FILE))
    for name in SETTINGS:
        if env_var(name) in environ:
            values[name] = _convert(name, environ[env_var(name)], env_var(name))
    for name in SETTINGS:
        if name in vars(args):
            values[name] = _convert(name, getattr(args, name), flag(name))
    if values.get("region") is None:
        # boto3's own lookup: AWS_REGION, AWS_DEFAULT_REGION, then the profile. No network.
        values["region"] = boto3.session.Session().region_name
    return DeployConfig(**values)


def _read_file(path: Path) -> dict[str, Any]:
    path = path.resolve()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    values = {name: _convert(name, value, f"{path}: {name}") for name, value in data.items()}
    # Relative paths in the file mean relative to the file, not to wherever the CLI runs.
    return {
        name: path.parent / value if isinstance(value, Path) and not value.is_absolute() else value
        for name, value in values.items()
    }


def _kind(name: str) -> type:
    """The type a setting's text is converted with: `int | None` -> int, `tuple[str, ...]` -> tuple."""
    hint = HINTS[name]
    if typing.get_origin(hint) is tuple:
        return tuple
    choices = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return choices[0] if choices else hint


def _convert(name: str, raw: Any, source: str) -> Any:
    kind = _kind(name)
    try:
        if kind is tuple:
            items = raw.replace(",", " ").split() if isinstance(raw, str) else raw
            return tuple(str(item) for item in items)
        if isinstance(raw, str) and not raw.strip() and not SETTINGS[name].metadata["keep_blank"]:
            return SETTINGS[name].default  # VAR= means "not set"
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {raw!r} is not a valid {kind.__name__}") from None


def _show_default(setting: dataclasses.Field) -> str:
    value = setting.default
    if isinstance(value, tuple):
        return " ".join(value)
    if isinstance(value, Path):
        return str(value.relative_to(REPO_ROOT)) if value.is_relative_to(REPO_ROOT) else str(value)
    return "none" if value is None else str(value)


# --- validation, before any AWS call ---------------------------------------------------------------


def known_regions() -> set[str]:
    """SageMaker regions in botocore's bundled endpoint data, every partition (no network)."""
    session = boto3.session.Session()
    return {
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("sagemaker", partition_name=partition)
    }


def check_project(cfg: DeployConfig) -> None:
    if len(cfg.project) > PROJECT_MAX or not PROJECT_PATTERN.match(cfg.project):
        raise ConfigError(
            f"project {cfg.project!r}: use lowercase letters, digits and single hyphens, at most {PROJECT_MAX} "
            "characters (it prefixes every resource name)"
        )
    unknown = [name for name in cfg.models if name not in MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")


def check_region(cfg: DeployConfig) -> None:
    if not cfg.region:
        raise ConfigError(f"no region: set {flag('region')}, ${env_var('region')} or AWS_REGION")
    if cfg.region not in known_regions():
        raise ConfigError(f"unknown region {cfg.region!r}: SageMaker is not offered there (per botocore's data)")


def check_endpoint_settings(cfg: DeployConfig) -> None:
    if cfg.instance_type not in INSTANCE_TYPES:
        raise ConfigError(
            f"instance type {cfg.instance_type!r} is not one deploy offers ({', '.join(INSTANCE_TYPES)}); "
            "to offer another, add it with its on-demand price to serving/sdserve/instances.py"
        )
    if cfg.instance_count < 1:
        raise ConfigError(f"instance count must be at least 1, got {cfg.instance_count}")
    if cfg.poll_seconds <= 0 or cfg.wait_timeout_seconds <= 0:
        raise ConfigError("poll and wait times must be positive")
    check_autoscaling(cfg)


def check_autoscaling(cfg: DeployConfig) -> None:
    if cfg.autoscale_min is not None and cfg.autoscale_max is None:
        raise ConfigError(f"{flag('autoscale_min')} needs {flag('autoscale_max')} too")
    if not cfg.autoscaling:
        return
    low = cfg.autoscale_min if cfg.autoscale_min is not None else cfg.instance_count
    if low < 1 or cfg.autoscale_max < low:
        raise ConfigError(f"autoscaling bounds must satisfy 1 <= min <= max, got min {low}, max {cfg.autoscale_max}")
    if cfg.autoscale_target <= 0:
        raise ConfigError(f"autoscaling target must be positive, got {cfg.autoscale_target}")


def autoscale_bounds(cfg: DeployConfig) -> tuple[int, int]:
    low = cfg.autoscale_min if cfg.autoscale_min is not None else cfg.instance_count
    return low, cfg.autoscale_max


def check_bucket(cfg: DeployConfig) -> None:
    if not cfg.bucket:
        raise ConfigError(f"no S3 bucket configured: set {flag('bucket')}, ${env_var('bucket')} or bucket in deploy.toml")
    if not BUCKET_PATTERN.match(cfg.bucket):
        raise ConfigError(f"{cfg.bucket!r} is not a valid S3 bucket name")


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be the archives' S3 prefix, or None when it can."""
    body = prefix.removesuffix("/")
    segments = body.split("/")
    odd = sorted({char for char in body if not PREFIX_CHARACTER.fullmatch(char)} - {"/"})
    problems = (
        (not body, "it is empty (the archives would sit at the bucket's root)"),
        (len(body) > PREFIX_MAX, f"it is longer than {PREFIX_MAX} characters"),
        (body.startswith("/"), "it starts with '/' (S3 keys are relative)"),
        ("" in segments, "it has an empty segment ('//')"),
        (bool({".", ".."} & set(segments)), "it has a '.' or '..' segment"),
        (bool(odd), "it contains " + ", ".join(ascii(char) for char in odd)),
    )
    return next((reason for failed, reason in problems if failed), None)


def check_prefix(cfg: DeployConfig) -> None:
    # The defaults, <project>/models and <project>/results, are valid when the project is.
    for name, value, example in (("prefix", cfg.prefix, "models"), ("results_prefix", cfg.results_prefix, "results")):
        problem = None if value is None else prefix_problem(value)
        if problem:
            raise ConfigError(
                f"{flag(name)} {value!r} (also ${env_var(name)}, {name} in deploy.toml): {problem}; "
                f"the S3 prefix must be {PREFIX_RULE}, e.g. {cfg.project}/{example}"
            )


def check_results_bucket(cfg: DeployConfig) -> None:
    if cfg.results_bucket is not None and not BUCKET_PATTERN.match(cfg.results_bucket):
        raise ConfigError(f"{flag('results_bucket')}: {cfg.results_bucket!r} is not a valid S3 bucket name")


def check_role(cfg: DeployConfig) -> None:
    if not cfg.role_arn:
        raise ConfigError(
            f"no SageMaker execution role: set {flag('role_arn')}, ${env_var('role_arn')} or role_arn in deploy.toml"
        )
    if not ROLE_ARN_PATTERN.match(cfg.role_arn):
        # The value is not repeated: a mistyped ARN still holds an account id, which logs should not.
        raise ConfigError(f"{flag('role_arn')} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")


def check_base_image_digest(cfg: DeployConfig, *, allow_unpinned: bool = False) -> None:
    """`package --image` builds FROM the Triton image by digest; without one only when told."""
    if cfg.triton_image_digest is None:
        if allow_unpinned:
            return
        raise ConfigError(
            f"no Triton image digest: `package --image` builds on the sagemaker-tritonserver {cfg.triton_version} "
            f"image by digest, since its tag can be moved. Read the digest (docs/deploy.md: `aws ecr batch-get-image`), "
            f"check it, and set {flag('triton_image_digest')}, ${env_var('triton_image_digest')} or "
            f"triton_image_digest in deploy.toml; or pass {UNPINNED_FLAG} to build on whatever the tag names now"
        )
    if not DIGEST_PATTERN.match(cfg.triton_image_digest):
        raise ConfigError(f"{flag('triton_image_digest')} {cfg.triton_image_digest!r}: not a digest "
                          "(sha256: then 64 lowercase hexadecimal digits)")


def check_image_uri(cfg: DeployConfig, *, allow_unpinned: bool = False) -> None:
    """A prebuilt serving image is named by digest; by tag only when told."""
    if cfg.image_uri is None or allow_unpinned or PINNED_IMAGE_PATTERN.match(cfg.image_uri):
        return
    # The value is not repeated: an ECR image URI holds the account id.
    raise ConfigError(
        f"{flag('image_uri')} must name the image by digest, <registry>/<repository>@sha256:<64 hex> "
        f"(`aws ecr describe-images` shows it), since a tag can be moved; or pass {UNPINNED_FLAG}"
    )


def check_weights(cfg: DeployConfig, models: tuple[str, ...] | None = None) -> None:
    missing = [name for name in models or cfg.models if not has_checkpoint(cfg.repository, name)]
    if missing:
        raise ConfigError(f"no weights for {', '.join(missing)} in {cfg.repository}: {WEIGHTS_HINT}")
