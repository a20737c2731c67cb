"""`python -m deploy`: the four Stable Diffusion models on one SageMaker multi-model endpoint.

    python -m deploy                      same as `plan`: print every AWS call, change nothing
    python -m deploy weights --tiny       test weights (or --hub for the real fp16 ones)
    python -m deploy package --image      build + push the serving image (needs docker), then
                                          build the model archives and upload what changed
    python -m deploy up                   create or update the endpoint, wait for InService
    python -m deploy add-model NAME       one more archive for the live endpoint
    python -m deploy list                 the archives on S3
    python -m deploy invoke               one image per model, written to build/smoke
    python -m deploy down                 delete it all (its archives only with --delete-artifacts)
    python -m deploy policy studio        an IAM policy as JSON: deployer, execution-role or studio

Every command validates its settings before its first AWS call.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from deploy import image, sagemaker_endpoint, upload
from serving.archive import REPO_ROOT, archive_name
from deploy.aws import Aws, DeployError, redact
from deploy.config import (
    UNPINNED_FLAG,
    ConfigError,
    DeployConfig,
    add_config_arguments,
    check_base_image_digest,
    check_bucket,
    check_endpoint_settings,
    check_image_uri,
    check_prefix,
    check_project,
    check_region,
    check_results_bucket,
    check_role,
    check_weights,
    load_config,
)
from deploy.invoke import smoke_test
from deploy.plan import print_plan
from deploy.policy import POLICIES, render

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # becomes an S3 key and a TargetModel
ACCOUNT_PATTERN = re.compile(r"^\d{12}$")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "plan")  # when in doubt, show what would happen
    args = build_parser().parse_args(argv)
    try:
        return args.run(load_config(args), args)
    except ConfigError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    except DeployError as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as error:
        # botocore's messages name the operation and the reason, never the credentials; AWS's
        # reasons often quote ARNs (AccessDenied: "User: arn:aws:iam::<account>:..."), hence redact.
        print(f"error: AWS: {redact(str(error))}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    settings = argparse.ArgumentParser(add_help=False)
    add_config_arguments(settings)
    parser = argparse.ArgumentParser(
        prog="python -m deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `python -m deploy COMMAND --help` for a command's options and settings.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[DeployConfig, argparse.Namespace], int], summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[settings], help=summary, description=summary)
        sub.set_defaults(run=run)
        return sub

    command("plan", run_plan, "print every AWS call the other commands make, with arguments; change nothing")

    weights = command("weights", run_weights, "write weights into the model folders (python -m serving.weights)")
    source = weights.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="tiny random-weight pipelines, offline (images are noise)")
    source.add_argument("--hub", action="store_true", help="the real fp16 weights from the Hugging Face Hub")
    weights.add_argument("--keep-existing", action="store_true", help="with --tiny: keep weights already there")

    package = command("package", run_package, "build the model archives and upload those that changed")
    package.add_argument("--image", action="store_true",
                         help="first build deploy/triton_image and push it to ECR (needs docker)")
    package.add_argument("--no-upload", action="store_true", help="only build the archives")
    unpinned(package, "with --image: build on the Triton image its tag names now when no "
                      "--triton-image-digest is set")

    up = command("up", run_up, "create the endpoint, or update it in place when the configuration changed")
    unpinned(up, "accept an --image-uri named by tag rather than by digest")

    add_model = command("add-model", run_add_model, "upload one more model archive for the live endpoint")
    add_model.add_argument("name", help="a Triton model folder in the repository, with weights")

    command("list", run_list, "list the archives under the S3 prefix (key, size, sha256, last modified)")

    invoke = command("invoke", run_invoke, "one smoke request per model (boto3, the request format of sdserve.wire)")
    invoke.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "smoke", help="where the PNGs go")
    invoke.add_argument("--steps", type=int, default=20, help="denoising steps per image (default: 20)")
    invoke.add_argument("--seed", type=int, default=1234, help="seed, for images that can be compared")

    down = command("down", run_down, "delete the endpoint, its configs, models and autoscaling registration")
    down.add_argument("--delete-artifacts", action="store_true",
                      help="also delete the archives of --models under the S3 prefix (other objects there are kept)")

    policy = command("policy", run_policy, "print an IAM policy (JSON) for this configuration's names; no AWS calls")
    policy.add_argument("principal", choices=sorted(POLICIES),
                        help="deployer: who runs python -m deploy; execution-role: the --role-arn role; "
                             "studio: the studio's IAM user (InvokeEndpoint for the model archives only; "
                             "with --results-bucket, its results under --results-prefix too)")
    policy.add_argument("--account", help="the 12-digit AWS account id to write into the ARNs (default: ACCOUNT)")
    return parser


def unpinned(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(UNPINNED_FLAG, dest="allow_unpinned_images", action="store_true",
                        help=f"{what} (a tag can be moved to other contents; a digest cannot)")


def connect(cfg: DeployConfig) -> Aws:
    return Aws(cfg.region, cfg.aws_endpoint_url)


# --- the commands, each validating before its first AWS call ------------------------------------


def run_plan(cfg: DeployConfig, args: argparse.Namespace) -> int:
    print_plan(cfg)
    return 0


def run_weights(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    if args.keep_existing and args.hub:
        raise ConfigError("--keep-existing goes with --tiny")
    command = [sys.executable, "-m", "serving.weights", "hub" if args.hub else "tiny",
               "--models", *cfg.models, "--repository", str(cfg.repository)]
    if args.keep_existing:
        command.append("--keep-existing")
    return subprocess.run(command, cwd=REPO_ROOT).returncode


def run_package(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    check_weights(cfg)
    if args.image or not args.no_upload:
        check_region(cfg)
    if not args.no_upload:
        check_bucket(cfg)
        check_prefix(cfg)
    if args.image:
        check_base_image_digest(cfg, allow_unpinned=args.allow_unpinned_images)
        image.require_docker()
    aws = connect(cfg)
    if not args.no_upload:
        upload.ensure_bucket(cfg, aws)  # before minutes of packing, not after
    if args.image:
        image.build_and_push(cfg, aws, allow_unpinned=args.allow_unpinned_images)
    archives = upload.build_archives(cfg, cfg.models)
    if not args.no_upload:
        upload.upload_all(cfg, aws, archives)
    return 0


def run_up(cfg: DeployConfig, args: argparse.Namespace) -> int:
    for check in (check_project, check_region, check_endpoint_settings, check_bucket, check_prefix, check_role):
        check(cfg)
    check_image_uri(cfg, allow_unpinned=args.allow_unpinned_images)
    if not cfg.gpu_instance:
        print(f"warning: {cfg.instance_type} has no GPU, and the archives' config.pbtxt asks for KIND_GPU")
    aws = connect(cfg)
    upload.ensure_bucket(cfg, aws)
    serving_image = cfg.image_uri or image.extended_image_uri(cfg, aws)
    sagemaker_endpoint.up(cfg, aws, serving_image)
    return 0


def run_add_model(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    check_region(cfg)
    if not MODEL_NAME_PATTERN.match(args.name) or not (cfg.repository / args.name / "config.pbtxt").is_file():
        raise ConfigError(f"no Triton model folder {cfg.repository / args.name} (with a config.pbtxt)")
    check_weights(cfg, (args.name,))
    aws = connect(cfg)
    bucket, prefix = _split_s3_url(sagemaker_endpoint.live_model_data_url(cfg, aws))
    (archive,) = upload.build_archives(cfg, (args.name,))
    upload.upload(aws, bucket, f"{prefix}{archive_name(args.name)}", archive)
    print(f"{args.name}: invokable on {cfg.endpoint_name} with TargetModel='{archive_name(args.name)}' (no redeploy)")
    return 0


def run_list(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    check_region(cfg)
    check_bucket(cfg)
    check_prefix(cfg)
    aws = connect(cfg)
    upload.ensure_bucket(cfg, aws)
    upload.print_archives(upload.list_archives(aws, cfg.bucket, cfg.s3_prefix), cfg.model_data_url)
    return 0


def run_invoke(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    check_region(cfg)
    return 0 if smoke_test(cfg, args.out, steps=args.steps, seed=args.seed) else 1


def run_down(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    check_region(cfg)
    if args.delete_artifacts:
        check_bucket(cfg)
        check_prefix(cfg)
    aws = connect(cfg)
    sagemaker_endpoint.down(cfg, aws)
    if args.delete_artifacts:
        upload.delete_archives(cfg, aws)
    else:
        print(f"archives under {cfg.s3_prefix}/ kept (--delete-artifacts deletes those of {' '.join(cfg.models)})")
    return 0


def run_policy(cfg: DeployConfig, args: argparse.Namespace) -> int:
    check_project(cfg)
    check_prefix(cfg)
    if cfg.region:  # otherwise REGION stays a placeholder, as do BUCKET and ACCOUNT
        check_region(cfg)
    if cfg.bucket:
        check_bucket(cfg)
    check_results_bucket(cfg)
    if cfg.role_arn:
        check_role(cfg)
    if args.account is not None and not ACCOUNT_PATTERN.match(args.account):
        raise ConfigError("--account takes the 12-digit AWS account id")
    print(render(POLICIES[args.principal](cfg, args.account)))
    return 0


def _split_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix/ -> ("bucket", "some/prefix/")"""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/"
