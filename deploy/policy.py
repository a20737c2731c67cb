"""The IAM policies of the three principals, generated from the configuration (`python -m deploy policy`).

* deployer: whoever runs `python -m deploy`; exactly the calls the commands make (see `plan`), on
  the names they give;
* execution-role: the SageMaker execution role (`--role-arn`) the endpoint's containers run as;
* studio: the studio's IAM user (a Hugging Face Space's secrets): InvokeEndpoint on this endpoint,
  for this configuration's model archives only; with `--results-bucket`, the calls its results
  store makes (studio/blobs.py) on that bucket, under `--results-prefix` only.

The names come from the same `DeployConfig` properties the commands use, so a policy follows
`--project`, `--prefix` and `--models`. What the configuration does not know is a placeholder:
REGION and BUCKET until set, ACCOUNT unless `--account` is given (the deployer never looks its
account up). A `"*"` resource is left only where the action has no resource-level permissions;
each such statement says why in `WHY_UNSCOPED`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3

from serving.archive import archive_name
from deploy.config import DeployConfig
from deploy.sagemaker_endpoint import SCALABLE_DIMENSION

VERSION = "2012-10-17"
# The SageMaker Triton image's registry in most regions (the base image `package --image` pulls;
# the URI `plan` prints names the region's own).
TRITON_REGISTRY_ACCOUNT = "763104351884"
AUTOSCALING_SERVICE = "sagemaker.application-autoscaling.amazonaws.com"
AUTOSCALING_ROLE = (f"role/aws-service-role/{AUTOSCALING_SERVICE}/"
                    "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint")
# Statements that keep "Resource": "*", and why (checked by the tests: no other statement may).
WHY_UNSCOPED = {
    "SageMakerLists": "ListModels and ListEndpointConfigs have no resource-level permissions",
    "AutoscalingReads": "the Describe* calls of Application Auto Scaling have no resource-level permissions",
    "EcrLogin": "ecr:GetAuthorizationToken is account-wide",
    "EcrAuth": "ecr:GetAuthorizationToken is account-wide",
    "Metrics": "cloudwatch:PutMetricData has no resources; the namespace condition scopes it",
}

Statement = dict[str, Any]
Policy = dict[str, Any]


@dataclass(frozen=True)
class Arns:
    """ARNs in one partition, region and account."""

    partition: str
    region: str
    account: str

    def regional(self, service: str, resource: str, *, account: str | None = None) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{account or self.account}:{resource}"

    def iam(self, resource: str) -> str:
        """IAM ARNs have no region."""
        return f"arn:{self.partition}:iam::{self.account}:{resource}"

    def s3(self, bucket: str, key: str = "") -> str:
        """S3: neither region nor account."""
        return f"arn:{self.partition}:s3:::{bucket}{'/' + key if key else ''}"


def arns(cfg: DeployConfig, account: str | None) -> Arns:
    region = cfg.region or "REGION"
    # aws, aws-cn or aws-us-gov: botocore's bundled data, no network.
    partition = boto3.session.Session().get_partition_for_region(cfg.region) if cfg.region else "aws"
    return Arns(partition, region, account or "ACCOUNT")


def allow(sid: str, actions: list[str] | str, resources: list[str] | str, condition: dict | None = None) -> Statement:
    statement: Statement = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        statement["Condition"] = condition
    return statement


def document(*statements: Statement) -> Policy:
    return {"Version": VERSION, "Statement": list(statements)}


def _bucket(cfg: DeployConfig) -> str:
    return cfg.bucket or "BUCKET"


def _execution_role(cfg: DeployConfig, arn: Arns) -> str:
    return cfg.role_arn or arn.iam(f"role/{cfg.project}-sagemaker-execution")


# --- the three policies ----------------------------------------------------------------------------


def deployer_policy(cfg: DeployConfig, account: str | None = None) -> Policy:
    """What `python -m deploy` needs: every call its commands make, on the names they give."""
    arn = arns(cfg, account)
    bucket, prefix = _bucket(cfg), cfg.s3_prefix
    ecr_repository = arn.regional("ecr", f"repository/{cfg.ecr_repository}")
    return document(
        # head_bucket needs ListBucket without a prefix condition.
        allow("Bucket", "s3:ListBucket", arn.s3(bucket)),
        # `list` heads every object under the prefix; writes and deletes only ever touch archives.
        allow("ReadArchives", "s3:GetObject", arn.s3(bucket, f"{prefix}/*")),
        allow("WriteArchives", ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
              arn.s3(bucket, f"{prefix}/*{archive_name('')}")),
        allow("SageMakerResources",
              ["sagemaker:CreateModel", "sagemaker:DescribeModel", "sagemaker:DeleteModel",
               "sagemaker:CreateEndpointConfig", "sagemaker:DescribeEndpointConfig", "sagemaker:DeleteEndpointConfig",
               "sagemaker:CreateEndpoint", "sagemaker:DescribeEndpoint", "sagemaker:UpdateEndpoint",
               "sagemaker:DeleteEndpoint", "sagemaker:InvokeEndpoint", "sagemaker:AddTags"],
              [arn.regional("sagemaker", f"model/{cfg.project}-model-*"),
               arn.regional("sagemaker", f"endpoint-config/{cfg.project}-config-*"),
               arn.regional("sagemaker", f"endpoint/{cfg.endpoint_name}")]),
        allow("SageMakerLists", ["sagemaker:ListModels", "sagemaker:ListEndpointConfigs"], "*"),
        allow("PassExecutionRole", "iam:PassRole", _execution_role(cfg, arn),
              {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}),
        # Scalable-target ARNs end in an id AWS picks at registration, so the writes are scoped by
        # the service namespace and dimension instead of by name.
        allow("AutoscalingWrites",
              ["application-autoscaling:RegisterScalableTarget", "application-autoscaling:DeregisterScalableTarget",
               "application-autoscaling:PutScalingPolicy", "application-autoscaling:DeleteScalingPolicy"],
              arn.regional("application-autoscaling", "scalable-target/*"),
              {"StringEquals": {"application-autoscaling:service-namespace": "sagemaker",
                                "application-autoscaling:scalable-dimension": SCALABLE_DIMENSION}}),
        allow("AutoscalingReads",
              ["application-autoscaling:DescribeScalableTargets", "application-autoscaling:DescribeScalingPolicies"], "*"),
        # Target tracking makes (and deletes) its two alarms with the caller's permissions; they
        # are named TargetTracking-<resource id>-AlarmHigh|AlarmLow-<uuid>.
        allow("AutoscalingAlarms", ["cloudwatch:PutMetricAlarm", "cloudwatch:DescribeAlarms", "cloudwatch:DeleteAlarms"],
              arn.regional("cloudwatch", f"alarm:TargetTracking-{cfg.scaling_resource_id}-*")),
        allow("AutoscalingServiceLinkedRole", "iam:CreateServiceLinkedRole", arn.iam(AUTOSCALING_ROLE),
              {"StringLike": {"iam:AWSServiceName": AUTOSCALING_SERVICE}}),
        allow("EcrLogin", "ecr:GetAuthorizationToken", "*"),
        allow("EcrPush",
              ["ecr:CreateRepository", "ecr:DescribeRepositories", "ecr:DescribeImages",
               "ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart",
               "ecr:CompleteLayerUpload", "ecr:PutImage", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
              ecr_repository),
        allow("EcrPullBaseImage", ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
              arn.regional("ecr", "repository/sagemaker-tritonserver", account=TRITON_REGISTRY_ACCOUNT)),
    )


def execution_role_policy(cfg: DeployConfig, account: str | None = None) -> Policy:
    """What the endpoint's containers need: the archives, the image, their logs and metrics."""
    arn = arns(cfg, account)
    bucket, prefix = _bucket(cfg), cfg.s3_prefix
    return document(
        allow("ReadArchives", "s3:GetObject", arn.s3(bucket, f"{prefix}/*")),
        allow("ListArchives", "s3:ListBucket", arn.s3(bucket), {"StringLike": {"s3:prefix": f"{prefix}/*"}}),
        allow("EcrAuth", "ecr:GetAuthorizationToken", "*"),
        allow("PullImage", ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
              [arn.regional("ecr", f"repository/{cfg.ecr_repository}"),
               arn.regional("ecr", "repository/sagemaker-tritonserver", account=TRITON_REGISTRY_ACCOUNT)]),
        allow("Logs", ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
              arn.regional("logs", f"log-group:/aws/sagemaker/Endpoints/{cfg.endpoint_name}:*")),
        allow("Metrics", "cloudwatch:PutMetricData", "*", {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}),
    )


def studio_policy(cfg: DeployConfig, account: str | None = None) -> Policy:
    """The studio's user: InvokeEndpoint on this endpoint, for this configuration's archives only.

    A multi-model endpoint serves any archive under its prefix to whoever may invoke it; the
    sagemaker:TargetModel condition key (SageMaker's "Multi-Model Endpoint Security" guide)
    limits the TargetModel a request may name. A request without one does not match, so it is
    refused too.
    """
    arn = arns(cfg, account)
    invoke = allow("InvokeStudioModels", "sagemaker:InvokeEndpoint",
                   arn.regional("sagemaker", f"endpoint/{cfg.endpoint_name}"),
                   {"StringEquals": {"sagemaker:TargetModel": [archive_name(model) for model in cfg.models]}})
    if not cfg.results_bucket:
        return document(invoke)
    bucket, prefix = cfg.results_bucket, cfg.s3_results_prefix
    return document(
        invoke,
        # The results store (studio --results-bucket): images, owners' markers and its keys, all
        # under the prefix. PutObject with If-None-Match (the keys made once) needs nothing more.
        allow("StudioResults", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], arn.s3(bucket, f"{prefix}/*")),
        # Its listings (the start's, and one-key listings in place of HeadObject) name the prefix.
        allow("ListStudioResults", "s3:ListBucket", arn.s3(bucket), {"StringLike": {"s3:prefix": f"{prefix}/*"}}),
    )


POLICIES: dict[str, Callable[[DeployConfig, str | None], Policy]] = {
    "deployer": deployer_policy,
    "execution-role": execution_role_policy,
    "studio": studio_policy,
}


def render(policy: Policy) -> str:
    """The JSON to paste into IAM."""
    return json.dumps(policy, indent=2)
