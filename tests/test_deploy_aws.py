"""python -m deploy against moto in server mode on 127.0.0.1, with real boto3 on both sides."""

from __future__ import annotations

import hashlib
import re

import pytest
from sdserve.catalog import MODELS

from tests.deploy_support import (
    ACCOUNT,
    BUCKET,
    IMAGE,
    REGION,
    ROLE,
    aws_client,
)
from tests.test_archive import make_model


PREFIX = "sd-studio/models"


@pytest.fixture
def s3(moto):
    client = aws_client(moto, "s3")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def sagemaker(moto):
    return aws_client(moto, "sagemaker")


@pytest.fixture
def autoscaling(moto):
    return aws_client(moto, "application-autoscaling")


@pytest.fixture
def settings(repository):
    """Flags for a complete configuration, with the fake repository and a fast poll. (moto 5.2.5's
    list of instance types predates ml.g5, the default, so the tests use the g4dn GPU family.)"""
    return ("--region", REGION, "--bucket", BUCKET, "--role-arn", ROLE, "--image-uri", IMAGE,
            "--repository", str(repository), "--poll-seconds", "0.01", "--instance-type", "ml.g4dn.2xlarge")


def stored(s3, prefix=PREFIX) -> dict[str, str]:
    """key -> sha256 metadata of every object under the prefix."""
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    return {key: s3.head_object(Bucket=BUCKET, Key=key)["Metadata"].get("sha256") for key in keys}


def names(sagemaker) -> tuple[list[str], list[str]]:
    models = sorted(m["ModelName"] for m in sagemaker.list_models()["Models"])
    configs = sorted(c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"])
    return models, configs


# --- plan -------------------------------------------------------------------------------------------


@pytest.mark.aws
def test_plan_creates_nothing(deploy, s3, sagemaker, settings):
    code, out, _ = deploy("plan", *settings)
    assert code == 0 and "sagemaker.create_endpoint(" in out
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [BUCKET]
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    assert names(sagemaker) == ([], [])
    assert "Before these commands can run" not in out, "a complete configuration has no problems"


# --- package + upload ----------------------------------------------------------------------------


@pytest.mark.aws
def test_package_uploads_once_and_again_only_what_changed(deploy, s3, settings, repository, tmp_path):
    code, out, _ = deploy("package", *settings)
    assert code == 0
    archives = tmp_path / "build" / "model-store"
    expected = {f"{PREFIX}/{name}.tar.gz": hashlib.sha256((archives / f"{name}.tar.gz").read_bytes()).hexdigest()
                for name in ("sd_base", "sd_depth", "sd_inpaint", "sd_upscale")}
    assert stored(s3) == expected
    assert "tiny random weights" in out
    first = {key: s3.head_object(Bucket=BUCKET, Key=key)["ETag"] for key in expected}

    code, out, _ = deploy("package", *settings)
    assert code == 0 and out.count("unchanged, skipped") == 4 and "uploading" not in out

    (repository / "sd_depth/1/checkpoint/unet/diffusion_pytorch_model.safetensors").write_bytes(b"retrained")
    code, out, _ = deploy("package", *settings)
    assert code == 0 and out.count("unchanged, skipped") == 3
    assert "sd_depth: uploading" in out
    after = stored(s3)
    assert after[f"{PREFIX}/sd_depth.tar.gz"] != expected[f"{PREFIX}/sd_depth.tar.gz"]
    assert {k: v for k, v in after.items() if "sd_depth" not in k} == {k: v for k, v in expected.items() if "sd_depth" not in k}
    assert s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/sd_base.tar.gz")["ETag"] == first[f"{PREFIX}/sd_base.tar.gz"]


@pytest.mark.aws
def test_package_into_a_missing_bucket_is_a_clear_error(deploy, moto, settings):
    code, _, err = deploy("package", *settings)
    assert code == 1 and f"S3 bucket '{BUCKET}' does not exist" in err
    assert aws_client(moto, "s3").list_buckets()["Buckets"] == []


@pytest.mark.aws
def test_list_shows_key_size_sha_and_date(deploy, s3, settings):
    deploy("package", *settings, "--models", "sd_base", "sd_upscale")
    code, out, _ = deploy("list", *settings)
    assert code == 0 and f"2 archive(s) under s3://{BUCKET}/{PREFIX}/" in out
    for key, sha in stored(s3).items():
        line = next(line for line in out.splitlines() if line.startswith(key))
        assert sha in line and re.search(r" \d+(\.\d)? (B|KiB|MiB) ", line) and "T" in line.split()[-1]


# --- up -------------------------------------------------------------------------------------------


@pytest.mark.aws
def test_up_creates_a_multi_model_endpoint(deploy, s3, sagemaker, settings):
    deploy("package", *settings)
    code, out, err = deploy("up", *settings, "--instance-type", "ml.g4dn.xlarge")
    assert code == 0, out + err
    assert "sd-studio: InService" in out and "2 or more" in out

    endpoint = sagemaker.describe_endpoint(EndpointName="sd-studio")
    assert endpoint["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    (variant,) = config["ProductionVariants"]
    assert (variant["VariantName"], variant["InstanceType"], variant["InitialInstanceCount"]) == ("AllTraffic", "ml.g4dn.xlarge", 1)
    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Mode"] == "MultiModel"
    assert container["Image"] == IMAGE
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/{PREFIX}/"
    assert container["Environment"]["SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE"] == str(64 << 20)
    assert names(sagemaker) == ([variant["ModelName"]], [endpoint["EndpointConfigName"]])


@pytest.mark.aws
def test_up_again_unchanged_does_nothing(deploy, s3, sagemaker, settings):
    deploy("up", *settings)
    before = names(sagemaker)
    code, out, _ = deploy("up", *settings)
    assert code == 0 and "unchanged" in out
    assert "create_" not in out and "update_endpoint" not in out
    assert names(sagemaker) == before


@pytest.mark.aws
def test_up_with_a_new_instance_count_updates_in_place(deploy, s3, sagemaker, settings):
    deploy("up", *settings)
    (model,), (old_config,) = names(sagemaker)
    code, out, _ = deploy("up", *settings, "--instance-count", "2")
    assert code == 0 and "sagemaker.update_endpoint sd-studio" in out and "create_endpoint " not in out
    endpoint = sagemaker.describe_endpoint(EndpointName="sd-studio")
    assert endpoint["EndpointConfigName"] != old_config
    assert names(sagemaker) == ([model], [endpoint["EndpointConfigName"]]), "old config deleted, model reused"
    assert "2 or more" not in out
    assert sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])[
        "ProductionVariants"][0]["InitialInstanceCount"] == 2


@pytest.mark.aws
def test_up_with_a_new_image_replaces_the_model(deploy, s3, sagemaker, settings):
    deploy("up", *settings)
    (old_model,), _ = names(sagemaker)
    code, _, _ = deploy("up", *settings, "--image-uri", IMAGE.replace("1" * 64, "2" * 64))
    assert code == 0
    (model,), (config,) = names(sagemaker)
    assert model != old_model
    assert sagemaker.describe_model(ModelName=model)["PrimaryContainer"]["Image"].endswith("2" * 64)
    assert sagemaker.describe_endpoint(EndpointName="sd-studio")["EndpointConfigName"] == config


@pytest.mark.aws
def test_up_reports_a_failed_endpoint_and_exits_non_zero(deploy, s3, sagemaker, settings):
    from moto.sagemaker.models import sagemaker_backends

    deploy("up", *settings)
    live = sagemaker_backends[ACCOUNT][REGION].endpoints["sd-studio"]
    live.endpoint_status, live.failure_reason = "Failed", "CannotStartContainerError: no space left"
    code, _, err = deploy("up", *settings, "--instance-count", "2")
    assert code == 1 and "CannotStartContainerError: no space left" in err and "deploy down" in err


@pytest.mark.aws
def test_up_into_a_missing_bucket_is_a_clear_error(deploy, moto, sagemaker, settings):
    code, _, err = deploy("up", *settings)
    assert code == 1 and "does not exist" in err
    assert names(sagemaker) == ([], [])


# --- autoscaling ----------------------------------------------------------------------------------


@pytest.mark.aws
def test_autoscaling_is_registered_with_the_bounds_and_follows_changes(deploy, s3, autoscaling, settings):
    resource = "endpoint/sd-studio/variant/AllTraffic"
    code, out, _ = deploy("up", *settings, "--autoscale-min", "1", "--autoscale-max", "3", "--autoscale-target", "8")
    assert code == 0, out
    (target,) = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["ScalableDimension"]) == (resource, "sagemaker:variant:DesiredInstanceCount")
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    (policy,) = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling" and tracking["TargetValue"] == 8
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"

    code, out, _ = deploy("up", *settings, "--autoscale-min", "1", "--autoscale-max", "3", "--autoscale-target", "8")
    assert "register_scalable_target" not in out and "unchanged" in out

    deploy("up", *settings, "--instance-count", "2", "--autoscale-min", "2", "--autoscale-max", "5")
    (target,) = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 5)

    deploy("up", *settings, "--instance-count", "2")
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


# --- add-model ------------------------------------------------------------------------------------


@pytest.mark.aws
def test_add_model_uploads_under_the_live_endpoints_prefix(deploy, s3, settings, repository):
    deploy("up", *settings, "--prefix", "live/store")
    make_model(repository, "sd_base_anime", weights=b"fine-tuned")
    code, out, _ = deploy("add-model", "sd_base_anime", *settings, "--prefix", "ignored/by/add-model")
    assert code == 0 and "TargetModel='sd_base_anime.tar.gz'" in out
    assert list(stored(s3, "live/store")) == ["live/store/sd_base_anime.tar.gz"]
    code, out, _ = deploy("add-model", "sd_base_anime", *settings)
    assert "unchanged, skipped" in out


@pytest.mark.aws
def test_add_model_without_an_endpoint_is_a_clear_error(deploy, s3, settings):
    code, _, err = deploy("add-model", "sd_base", *settings)
    assert code == 1 and "no endpoint sd-studio" in err and "deploy up" in err


# --- down -----------------------------------------------------------------------------------------


@pytest.mark.aws
def test_down_removes_what_up_made_and_only_that(deploy, s3, sagemaker, autoscaling, settings):
    s3.put_object(Bucket=BUCKET, Key="notes/keep.txt", Body=b"not ours")
    s3.create_bucket(Bucket="someone-elses")
    s3.put_object(Bucket="someone-elses", Key=f"{PREFIX}/sd_base.tar.gz", Body=b"not ours either")
    container = {"Image": IMAGE, "ModelDataUrl": "s3://someone-elses/x/", "Mode": "MultiModel"}
    for name in ("other-model", "sd-studio-model-handmade"):  # the second looks like ours, isn't hashed
        sagemaker.create_model(ModelName=name, ExecutionRoleArn=ROLE, PrimaryContainer=container)
    sagemaker.create_endpoint_config(EndpointConfigName="other-config", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "other-model", "InstanceType": "ml.g4dn.xlarge", "InitialInstanceCount": 1}])
    deploy("package", *settings)
    deploy("up", *settings, "--autoscale-max", "2")
    deploy("up", *settings, "--instance-count", "2", "--autoscale-max", "2")

    code, out, _ = deploy("down", *settings)
    assert code == 0, out
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert names(sagemaker) == (["other-model", "sd-studio-model-handmade"], ["other-config"])
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert len(stored(s3)) == 4 and "kept" in out, "archives stay without --delete-artifacts"

    # Under the same prefix, but not archives this configuration uploads.
    unrelated = [f"{PREFIX}/notes.txt", f"{PREFIX}/sd_base_anime.tar.gz", f"{PREFIX}/older/sd_base.tar.gz"]
    for key in unrelated:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"not an archive of ours")
    code, out, _ = deploy("down", *settings, "--delete-artifacts")
    assert code == 0 and "no endpoint sd-studio" in out
    assert "deleted 4 archive(s)" in out and "kept 3 other object(s)" in out
    assert sorted(stored(s3)) == sorted(unrelated)
    assert s3.get_object(Bucket=BUCKET, Key=unrelated[0])["Body"].read() == b"not an archive of ours"
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]) == sorted(["notes/keep.txt", *unrelated])
    assert s3.get_object(Bucket="someone-elses", Key=f"{PREFIX}/sd_base.tar.gz")["Body"].read() == b"not ours either"


@pytest.mark.aws
def test_down_deletes_only_the_archives_of_the_configured_models(deploy, s3, settings):
    deploy("package", *settings)
    code, out, _ = deploy("down", *settings, "--delete-artifacts", "--models", "sd_base", "sd_depth")
    assert code == 0 and "deleted 2 archive(s)" in out
    assert sorted(stored(s3)) == [f"{PREFIX}/sd_inpaint.tar.gz", f"{PREFIX}/sd_upscale.tar.gz"]
    code, out, _ = deploy("down", *settings, "--delete-artifacts", "--models", "sd_base")
    assert code == 0 and "deleted 0 archive(s)" in out, "already gone: nothing to delete, no error"


def test_plan_shows_the_archive_keys_down_may_delete(deploy, settings):
    code, out, _ = deploy("plan", *settings, "--prefix", "team/store")
    assert code == 0
    down = out[out.index("== down"):]
    deleted = re.findall(r"\{'Key': '([^']+)'\}", down[down.index("s3.delete_objects("):])
    assert deleted == [f"team/store/{name}.tar.gz" for name in MODELS]


@pytest.mark.aws
def test_run_logs_mask_account_ids(deploy, s3, sagemaker, settings):
    from moto.sagemaker.models import sagemaker_backends

    deploy("up", *settings)
    live = sagemaker_backends[ACCOUNT][REGION].endpoints["sd-studio"]
    live.endpoint_status = "Failed"
    live.failure_reason = f"AccessDenied: {ROLE} may not read s3://{BUCKET}/{PREFIX}/sd_base.tar.gz"
    code, out, err = deploy("up", *settings, "--instance-count", "2")
    assert code == 1 and "arn:aws:iam::<account>:role/sd-studio-sagemaker may not read" in err
    assert ACCOUNT not in out + err


def test_down_reports_archives_s3_refused_to_delete(clean_env):
    """delete_objects answers 200 with per-key Errors (AccessDenied on one key, say): not a success."""
    from deploy.aws import DeployError
    from deploy.config import DeployConfig
    from deploy.upload import delete_archives

    class RefusingS3:
        def read(self, call):
            return {}  # head_bucket: the bucket exists

        def paginate(self, call, key):
            return [{"Key": f"{PREFIX}/sd_base.tar.gz"}, {"Key": f"{PREFIX}/notes.txt"}]

        def run(self, call):
            assert call.params["Delete"]["Objects"] == [{"Key": f"{PREFIX}/sd_base.tar.gz"}], "only our archive"
            return {"Errors": [{"Key": f"{PREFIX}/sd_base.tar.gz", "Code": "AccessDenied"}]}

    with pytest.raises(DeployError, match=r"could not delete sd-studio/models/sd_base.tar.gz \(AccessDenied\)"):
        delete_archives(DeployConfig(region=REGION, bucket=BUCKET), RefusingS3())
