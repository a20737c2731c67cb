"""`python -m deploy plan`: every AWS call the other commands make, with their arguments.

The calls are the same `Call` objects the commands run (built by the same functions), shown for a
first deployment; nothing is sent to AWS. Settings still missing show as <placeholders> and are
listed at the end with how to set them.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable

from deploy import image, sagemaker_endpoint, upload
from serving.archive import archive_name
from deploy.aws import Call, DeployError
from deploy.config import (
    ConfigError,
    DeployConfig,
    check_base_image_digest,
    check_bucket,
    check_endpoint_settings,
    check_image_uri,
    check_prefix,
    check_project,
    check_region,
    check_role,
    check_weights,
)

CHECKS: tuple[Callable[[DeployConfig], None], ...] = (
    check_project, check_region, check_endpoint_settings, check_bucket, check_prefix, check_role, check_weights,
    check_image_uri,
)


def print_plan(cfg: DeployConfig) -> None:
    problems = _problems(cfg)
    shown = dataclasses.replace(
        cfg,
        region=cfg.region or "<region>",
        bucket=cfg.bucket or "<bucket>",
        role_arn=cfg.role_arn or "<execution-role-arn>",
    )
    base = _base_image(cfg, problems) + "@" + (cfg.triton_image_digest or "<triton_image_digest>")
    repository = f"<account>.dkr.ecr.{shown.region}.amazonaws.com/{cfg.ecr_repository}"
    extended = f"{repository}:<base tag>-<hash>"
    serving_image = cfg.image_uri or f"{repository}@<digest of :<base tag>-<hash>>"
    store = f"s3://{shown.bucket}/{cfg.s3_prefix}/"
    print(f"Plan for project {cfg.project!r} in {shown.region}: the AWS calls each command makes, in order,")
    print("for a first deployment. Nothing is called now; <values> are known only when a command runs.\n")

    sections: list[tuple[str, str, list[Call]]] = [
        ("weights --tiny | --hub",
         f"runs `python -m serving.weights tiny|hub` for {' '.join(cfg.models)}; no AWS calls", []),
        ("package --image",
         f"docker login, build deploy/triton_image on {base}, push {extended}",
         image.planned_build(shown)),
        ("package",
         f"build {len(cfg.models)} archive(s) in {cfg.archive_dir}, upload those whose sha256 changed to {store}",
         upload.planned_upload(shown, cfg.models)),
        ("up",
         f"serve {store} with {serving_image} on {cfg.instance_count} x {cfg.instance_type}",
         [upload.head_bucket(shown), upload.list_archives_call(shown.bucket, cfg.s3_prefix)]
         + ([] if cfg.image_uri else image.planned_lookup(shown))
         + sagemaker_endpoint.planned_up(shown, serving_image)),
        ("add-model NAME",
         "upload one more archive under the live endpoint's ModelDataUrl (no redeploy)",
         sagemaker_endpoint.planned_live_store(shown)
         + [upload.head_archive("<bucket>", "<prefix>/NAME.tar.gz"),
            upload.upload_archive("<bucket>", "<prefix>/NAME.tar.gz",
                                  upload.Archive("NAME", cfg.archive_dir / "NAME.tar.gz", "<sha256>"))]),
        ("list", f"the archives under {store}",
         [upload.head_bucket(shown), upload.list_archives_call(shown.bucket, cfg.s3_prefix),
          dataclasses.replace(upload.head_archive(shown.bucket, "<each key>"), note="for its sha256 metadata")]),
        ("invoke", "one request per model (boto3, sdserve.wire), retried while a model loads",
         [Call("sagemaker-runtime", "invoke_endpoint",
               {"EndpointName": cfg.endpoint_name, "TargetModel": archive_name(model),
                "ContentType": "application/json", "Body": "<KServe v2 JSON>"}) for model in cfg.models]),
        ("down [--delete-artifacts]",
         "delete the scaling registration, the endpoint, our configs and models; with the flag, the archives "
         f"of {' '.join(cfg.models)} (other objects under {store} are kept)",
         sagemaker_endpoint.planned_down(shown)
         + [upload.list_archives_call(shown.bucket, cfg.s3_prefix),
            upload.delete_archives_call(shown.bucket, list(cfg.archive_keys))]),
    ]
    for title, summary, calls in sections:
        print(f"== {title}: {summary}")
        for call in calls:
            print(textwrap.indent(call.render(), "   "))
        print()
    if problems:
        print("Before these commands can run:")
        for problem in problems:
            print(f"  - {problem}")


def _problems(cfg: DeployConfig) -> list[str]:
    problems = []
    # `package --image` builds the serving image only when no prebuilt one is given.
    for check in CHECKS + (() if cfg.image_uri else (check_base_image_digest,)):
        try:
            check(cfg)
        except ConfigError as error:
            problems.append(str(error))
    return problems


def _base_image(cfg: DeployConfig, problems: list[str]) -> str:
    """The SDK's answer when the SDK is already installed; plan never installs it."""
    placeholder = f"<sagemaker-tritonserver {cfg.triton_version} image for the region, from the sagemaker SDK>"
    try:
        check_region(cfg)
        return image.base_image_uri(cfg, create_sdk_env=False) or placeholder
    except ConfigError:  # already among the problems
        return placeholder
    except DeployError as error:
        problems.append(str(error))
        return placeholder
