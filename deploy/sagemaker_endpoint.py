"""The multi-model endpoint's life: up (create or update in place), wait, autoscaling, down.

Names carry a hash of what they describe: `<project>-model-<hash>` of the container and role,
`<project>-config-<hash>` of the production variant. Models and endpoint configs cannot be
changed in place, so a changed configuration gets new ones, the endpoint is pointed at them with
update_endpoint, and the old ones are deleted; an unchanged configuration maps to the names
already live and `up` has nothing to do. `down` finds what to delete from the same names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from deploy.aws import Aws, Call, DeployError
from deploy.config import VARIANT_NAME, DeployConfig, autoscale_bounds
from deploy.upload import list_archives

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
BUSY = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
HASH_LENGTH = 10


def _hashed_name(cfg: DeployConfig, kind: str, content: Any) -> str:
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:HASH_LENGTH]
    return f"{cfg.project}-{kind}-{digest}"


def _owned(cfg: DeployConfig, kind: str) -> re.Pattern[str]:
    """Names `up` gives; nothing else is ever deleted."""
    return re.compile(rf"^{re.escape(cfg.project)}-{kind}-[0-9a-f]{{{HASH_LENGTH}}}$")


# --- the requests ----------------------------------------------------------------------------------


def container(cfg: DeployConfig, image: str) -> dict[str, Any]:
    return {
        "Image": image,
        "ModelDataUrl": cfg.model_data_url,  # the prefix: TargetModel names an archive under it
        "Mode": "MultiModel",
        "Environment": {
            # Python-backend shared memory for image tensors; the container's 16 MB default is
            # tight for batches of base64 PNGs and for the upscaler's 2048 px outputs.
            "SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE": str(cfg.shm_default_bytes),
            "SAGEMAKER_TRITON_SHM_GROWTH_BYTE_SIZE": str(cfg.shm_growth_bytes),
        },
    }


def tags(cfg: DeployConfig) -> list[dict[str, str]]:
    return [{"Key": "project", "Value": cfg.project}, {"Key": "managed-by", "Value": "python -m deploy"}]


def create_model(cfg: DeployConfig, image: str) -> Call:
    content = {"container": container(cfg, image), "role": cfg.role_arn}
    return Call("sagemaker", "create_model", {
        "ModelName": _hashed_name(cfg, "model", content),
        "ExecutionRoleArn": cfg.role_arn,
        "PrimaryContainer": container(cfg, image),
        "Tags": tags(cfg),
    }, "name from a hash of container + role; skipped when that model exists")


def create_endpoint_config(cfg: DeployConfig, model_name: str) -> Call:
    variants = [{
        "VariantName": VARIANT_NAME,
        "ModelName": model_name,
        "InstanceType": cfg.instance_type,
        "InitialInstanceCount": cfg.instance_count,
        "InitialVariantWeight": 1.0,
    }]
    return Call("sagemaker", "create_endpoint_config", {
        "EndpointConfigName": _hashed_name(cfg, "config", variants),
        "ProductionVariants": variants,
        "Tags": tags(cfg),
    }, "name from a hash of the variant; skipped when that config exists")


def describe_model(name: str) -> Call:
    return Call("sagemaker", "describe_model", {"ModelName": name})


def describe_endpoint_config(name: str) -> Call:
    return Call("sagemaker", "describe_endpoint_config", {"EndpointConfigName": name})


def describe_endpoint(cfg: DeployConfig) -> Call:
    return Call("sagemaker", "describe_endpoint", {"EndpointName": cfg.endpoint_name})


def create_endpoint(cfg: DeployConfig, config_name: str) -> Call:
    return Call("sagemaker", "create_endpoint", {
        "EndpointName": cfg.endpoint_name, "EndpointConfigName": config_name, "Tags": tags(cfg),
    }, "when the endpoint does not exist")


def update_endpoint(cfg: DeployConfig, config_name: str) -> Call:
    return Call("sagemaker", "update_endpoint", {"EndpointName": cfg.endpoint_name, "EndpointConfigName": config_name},
                "instead of create_endpoint when the endpoint exists with another config")


def delete_endpoint(cfg: DeployConfig) -> Call:
    return Call("sagemaker", "delete_endpoint", {"EndpointName": cfg.endpoint_name}, "when it exists")


def describe_scalable_target(cfg: DeployConfig) -> Call:
    return Call("application-autoscaling", "describe_scalable_targets", {
        "ServiceNamespace": "sagemaker", "ResourceIds": [cfg.scaling_resource_id], "ScalableDimension": SCALABLE_DIMENSION,
    })


def register_scalable_target(cfg: DeployConfig) -> Call:
    low, high = autoscale_bounds(cfg)
    return Call("application-autoscaling", "register_scalable_target", {
        "ServiceNamespace": "sagemaker", "ResourceId": cfg.scaling_resource_id,
        "ScalableDimension": SCALABLE_DIMENSION, "MinCapacity": low, "MaxCapacity": high,
    }, "with --autoscale-max")


def put_scaling_policy(cfg: DeployConfig) -> Call:
    return Call("application-autoscaling", "put_scaling_policy", {
        "PolicyName": cfg.scaling_policy_name, "ServiceNamespace": "sagemaker",
        "ResourceId": cfg.scaling_resource_id, "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": cfg.autoscale_target,
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            # Out fast, in slowly: a new GPU instance needs minutes to load models.
            "ScaleOutCooldown": 60,
            "ScaleInCooldown": 600,
        },
    }, "with --autoscale-max")


def describe_scaling_policies(cfg: DeployConfig) -> Call:
    return Call("application-autoscaling", "describe_scaling_policies", {
        "ServiceNamespace": "sagemaker", "ResourceId": cfg.scaling_resource_id, "ScalableDimension": SCALABLE_DIMENSION,
    })


def delete_scaling_policy(cfg: DeployConfig, name: str) -> Call:
    return Call("application-autoscaling", "delete_scaling_policy", {
        "PolicyName": name, "ServiceNamespace": "sagemaker",
        "ResourceId": cfg.scaling_resource_id, "ScalableDimension": SCALABLE_DIMENSION,
    })


def deregister_scalable_target(cfg: DeployConfig) -> Call:
    return Call("application-autoscaling", "deregister_scalable_target", {
        "ServiceNamespace": "sagemaker", "ResourceId": cfg.scaling_resource_id, "ScalableDimension": SCALABLE_DIMENSION,
    }, "when registered (its policies go first)")


def list_owned(cfg: DeployConfig, kind: str) -> Call:
    operation = {"model": "list_models", "config": "list_endpoint_configs"}[kind]
    return Call("sagemaker", operation, {"NameContains": f"{cfg.project}-{kind}-"}, "paginated; only hashed names of ours")


def delete_owned(kind: str, name: str) -> Call:
    operation, parameter = {"model": ("delete_model", "ModelName"),
                            "config": ("delete_endpoint_config", "EndpointConfigName")}[kind]
    return Call("sagemaker", operation, {parameter: name})


def planned_up(cfg: DeployConfig, image: str) -> list[Call]:
    model = create_model(cfg, image)
    config = create_endpoint_config(cfg, model.params["ModelName"])
    name = config.params["EndpointConfigName"]
    calls = [describe_endpoint(cfg), model, config, create_endpoint(cfg, name), update_endpoint(cfg, name),
             dataclasses.replace(describe_endpoint(cfg), note=f"every {cfg.poll_seconds:g} s until InService"),
             list_owned(cfg, "config"), list_owned(cfg, "model")]
    if cfg.autoscaling:
        calls += [describe_scalable_target(cfg), register_scalable_target(cfg), put_scaling_policy(cfg)]
    return calls


def planned_down(cfg: DeployConfig) -> list[Call]:
    return [
        describe_scalable_target(cfg), describe_scaling_policies(cfg),
        delete_scaling_policy(cfg, cfg.scaling_policy_name), deregister_scalable_target(cfg),
        describe_endpoint(cfg), delete_endpoint(cfg),
        list_owned(cfg, "config"), delete_owned("config", f"{cfg.project}-config-<hash>"),
        list_owned(cfg, "model"), delete_owned("model", f"{cfg.project}-model-<hash>"),
    ]


# --- up ------------------------------------------------------------------------------------------


def up(cfg: DeployConfig, aws: Aws, image: str) -> None:
    _warn_missing_archives(cfg, aws)
    model = create_model(cfg, image)
    config = create_endpoint_config(cfg, model.params["ModelName"])
    config_name = config.params["EndpointConfigName"]

    def poll() -> dict[str, Any]:
        return aws.run(describe_endpoint(cfg), echo=False)

    endpoint = aws.read(describe_endpoint(cfg))
    if endpoint is not None and endpoint["EndpointStatus"] in BUSY:
        print(f"endpoint {cfg.endpoint_name} is {endpoint['EndpointStatus']}; waiting for it to settle")
        endpoint = wait_for_endpoint(cfg, poll)
    if endpoint is not None and endpoint["EndpointStatus"] == "Failed":
        raise DeployError(
            f"endpoint {cfg.endpoint_name} is Failed ({endpoint.get('FailureReason', 'no reason given')}); "
            "run `python -m deploy down`, then `up` again"
        )
    if endpoint is not None and endpoint["EndpointConfigName"] == config_name:
        print(f"endpoint {cfg.endpoint_name} already runs {config_name}: unchanged")
    else:
        _ensure(aws, model, describe=describe_model(model.params["ModelName"]))
        _ensure(aws, config, describe=describe_endpoint_config(config_name))
        if endpoint is None:
            aws.run(create_endpoint(cfg, config_name))
        else:
            # SageMaker refuses updates that change a registered variant's instance type; the
            # scaling registration is set up again below.
            remove_autoscaling(cfg, aws)
            aws.run(update_endpoint(cfg, config_name))
        wait_for_endpoint(cfg, poll)
        _delete_unused(cfg, aws, keep={config_name, model.params["ModelName"]})
    apply_autoscaling(cfg, aws)
    print(f"endpoint {cfg.endpoint_name} InService in {cfg.region}: {cfg.instance_count} x {cfg.instance_type}, "
          f"models from {cfg.model_data_url}")
    if cfg.instance_count < 2:
        print("note: one instance has no failover; 2 or more across availability zones are recommended for production")


def _ensure(aws: Aws, create: Call, *, describe: Call) -> None:
    if aws.read(describe) is None:
        aws.run(create)


def _warn_missing_archives(cfg: DeployConfig, aws: Aws) -> None:
    present = {item.key for item in list_archives(aws, cfg.bucket, cfg.s3_prefix)}
    missing = [model for model in cfg.models if cfg.archive_key(model) not in present]
    if missing:
        print(f"warning: no archive yet for {', '.join(missing)} under {cfg.model_data_url} "
              "(run `python -m deploy package`); invoking them will fail until then")


def wait_for_endpoint(cfg: DeployConfig, describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Poll `describe` (describe_endpoint) until InService; print each status change and the time."""
    started, last = time.monotonic(), None
    while True:
        endpoint = describe()
        status = endpoint["EndpointStatus"]
        elapsed = time.monotonic() - started
        if status != last:
            print(f"  [{elapsed:5.0f} s] {cfg.endpoint_name}: {status}")
            last = status
        if status == "InService":
            return endpoint
        if status == "Failed":
            raise DeployError(f"endpoint {cfg.endpoint_name} failed: {endpoint.get('FailureReason', 'no reason given')}")
        if elapsed > cfg.wait_timeout_seconds:
            raise DeployError(f"endpoint {cfg.endpoint_name} still {status} after {cfg.wait_timeout_seconds:.0f} s")
        time.sleep(cfg.poll_seconds)


def _delete_unused(cfg: DeployConfig, aws: Aws, keep: set[str]) -> None:
    """Delete our endpoint configs, then models, other than the live ones (configs name models)."""
    for kind, key, name_key in (("config", "EndpointConfigs", "EndpointConfigName"), ("model", "Models", "ModelName")):
        for item in aws.paginate(list_owned(cfg, kind), key):
            name = item[name_key]
            if _owned(cfg, kind).match(name) and name not in keep:
                aws.run(delete_owned(kind, name))


# --- autoscaling ---------------------------------------------------------------------------------


def apply_autoscaling(cfg: DeployConfig, aws: Aws) -> None:
    """Make the registration match the configuration: registered with these bounds, or not at all."""
    targets = aws.run(describe_scalable_target(cfg), echo=False)["ScalableTargets"]
    if not cfg.autoscaling:
        if targets:
            remove_autoscaling(cfg, aws)
        return
    low, high = autoscale_bounds(cfg)
    policies = aws.run(describe_scaling_policies(cfg), echo=False)["ScalingPolicies"]
    if _registered_as_wanted(cfg, targets, policies):
        print(f"autoscaling {low}..{high} instances at {cfg.autoscale_target:g} invocations/instance/min: unchanged")
        return
    aws.run(register_scalable_target(cfg))
    aws.run(put_scaling_policy(cfg))
    print(f"autoscaling {low}..{high} instances, target {cfg.autoscale_target:g} invocations/instance/min")


def _registered_as_wanted(cfg: DeployConfig, targets: list[dict[str, Any]], policies: list[dict[str, Any]]) -> bool:
    if not targets:
        return False
    targets_by_policy = {
        policy["PolicyName"]: policy.get("TargetTrackingScalingPolicyConfiguration", {}).get("TargetValue")
        for policy in policies
    }
    return ((targets[0]["MinCapacity"], targets[0]["MaxCapacity"]) == autoscale_bounds(cfg)
            and targets_by_policy == {cfg.scaling_policy_name: cfg.autoscale_target})


def remove_autoscaling(cfg: DeployConfig, aws: Aws) -> None:
    if not aws.run(describe_scalable_target(cfg), echo=False)["ScalableTargets"]:
        return
    for policy in aws.run(describe_scaling_policies(cfg), echo=False)["ScalingPolicies"]:
        aws.run(delete_scaling_policy(cfg, policy["PolicyName"]))
    aws.run(deregister_scalable_target(cfg))


# --- down ----------------------------------------------------------------------------------------


def down(cfg: DeployConfig, aws: Aws) -> None:
    """Delete the scaling registration, the endpoint, and every config and model `up` made."""
    remove_autoscaling(cfg, aws)
    if aws.read(describe_endpoint(cfg)) is None:
        print(f"no endpoint {cfg.endpoint_name}")
    else:
        aws.run(delete_endpoint(cfg))
        _wait_until_deleted(cfg, aws)
    _delete_unused(cfg, aws, keep=set())


def _wait_until_deleted(cfg: DeployConfig, aws: Aws) -> None:
    started = time.monotonic()
    while aws.read(describe_endpoint(cfg)) is not None:
        if time.monotonic() - started > cfg.wait_timeout_seconds:
            raise DeployError(f"endpoint {cfg.endpoint_name} still exists after {cfg.wait_timeout_seconds:.0f} s")
        time.sleep(cfg.poll_seconds)
    print(f"  endpoint {cfg.endpoint_name} deleted")


# --- the live endpoint's model store -----------------------------------------------------------


def planned_live_store(cfg: DeployConfig) -> list[Call]:
    return [
        describe_endpoint(cfg),
        describe_endpoint_config("<the endpoint's config>"),
        describe_model("<the config's model>"),
    ]


def live_model_data_url(cfg: DeployConfig, aws: Aws) -> str:
    """The S3 prefix the running endpoint loads archives from (what `up` set as ModelDataUrl)."""
    endpoint = aws.read(describe_endpoint(cfg))
    if endpoint is None:
        raise DeployError(f"no endpoint {cfg.endpoint_name} in {cfg.region}: run `python -m deploy up` first")
    config = aws.run(describe_endpoint_config(endpoint["EndpointConfigName"]), echo=False)
    model = aws.run(describe_model(config["ProductionVariants"][0]["ModelName"]), echo=False)
    return model["PrimaryContainer"]["ModelDataUrl"]
