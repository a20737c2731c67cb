"""python -m deploy: configuration layers, and validation that stops before any AWS request."""

from __future__ import annotations

import argparse

import pytest
from botocore.exceptions import ClientError

from deploy import cli
from serving.archive import REPO_ROOT
from deploy.aws import DeployError
from deploy.cli import build_parser
from deploy.config import ConfigError, DeployConfig, check_prefix, load_config
from deploy.sagemaker_endpoint import wait_for_endpoint
from tests.deploy_support import (
    # noqa: F401
    ACCOUNT,
    BUCKET,
    REGION,
    ROLE,
)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", *argv])


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path, clean_env):
    config_file = tmp_path / "deploy.toml"
    config_file.write_text(
        'project = "from-file"\nbucket = "file-bucket"\ninstance_count = 3\nregion = "eu-west-1"\n'
        'models = ["sd_base"]\nrepository = "models"\n'
    )
    env = {"SD_DEPLOY_BUCKET": "env-bucket", "SD_DEPLOY_INSTANCE_COUNT": "4"}
    cfg = load_config(parse("--instance-count", "5"), env)
    assert cfg.instance_count == 5, "flag beats env and file"
    assert cfg.bucket == "env-bucket", "env beats file"
    assert (cfg.project, cfg.region, cfg.models) == ("from-file", "eu-west-1", ("sd_base",)), "file beats defaults"
    assert cfg.repository == tmp_path / "models", "relative paths in the file are relative to the file"
    assert cfg.instance_type == DeployConfig.instance_type, "defaults fill the rest"


def test_the_example_config_file_loads(clean_env):
    cfg = load_config(parse("--config", str(REPO_ROOT / "deploy" / "deploy.example.toml")), {})
    assert (cfg.bucket, cfg.instance_count, cfg.region) == ("my-sd-studio-artifacts", 2, "us-east-1")


def test_unknown_keys_in_the_file_are_refused(tmp_path, clean_env):
    (tmp_path / "deploy.toml").write_text('instance_cuont = 2\n')
    with pytest.raises(ConfigError, match="unknown setting.*instance_cuont"):
        load_config(parse(), {})


def test_names_derive_from_the_project(clean_env):
    cfg = load_config(parse("--project", "team-a", "--bucket", BUCKET), {})
    assert cfg.endpoint_name == "team-a"
    assert cfg.model_data_url == f"s3://{BUCKET}/team-a/models/"
    assert cfg.archive_key("sd_base") == "team-a/models/sd_base.tar.gz"
    assert cfg.ecr_repository == "team-a-triton"
    assert cfg.scaling_resource_id == "endpoint/team-a/variant/AllTraffic"


def test_region_falls_back_to_boto3(clean_env, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert load_config(parse(), {}).region == "eu-central-1"


def test_every_command_has_help(deploy):
    for command in ("plan", "weights", "package", "up", "add-model", "list", "invoke", "down", "policy"):
        with pytest.raises(SystemExit) as exit_:
            deploy(command, "--help")
        assert exit_.value.code == 0


# --- bad settings stop before the first request: the tripwire would count it -------------------

COMPLETE = ("--region", REGION, "--bucket", BUCKET, "--role-arn", ROLE)


@pytest.mark.parametrize(("argv", "env", "message"), [
    pytest.param(["up", "--region", "mars-north-1", "--bucket", BUCKET, "--role-arn", ROLE], {},
                 "unknown region 'mars-north-1'", id="unknown-region"),
    pytest.param(["up", "--bucket", BUCKET, "--role-arn", ROLE], {}, "no region", id="no-region"),
    pytest.param(["up", *COMPLETE, "--instance-count", "0"], {}, "instance count must be at least 1, got 0",
                 id="zero-instances"),
    pytest.param(["up", *COMPLETE], {"SD_DEPLOY_INSTANCE_COUNT": "-2"}, "at least 1, got -2", id="negative-instances"),
    pytest.param(["up", *COMPLETE], {"SD_DEPLOY_INSTANCE_COUNT": "two"}, "SD_DEPLOY_INSTANCE_COUNT: 'two' is not a valid int",
                 id="not-a-number"),
    pytest.param(["up", "--region", REGION, "--role-arn", ROLE], {}, "no S3 bucket configured", id="no-bucket"),
    pytest.param(["list", "--region", REGION], {}, "no S3 bucket configured", id="no-bucket-list"),
    pytest.param(["up", "--region", REGION, "--bucket", BUCKET], {}, "no SageMaker execution role", id="no-role"),
    pytest.param(["up", *COMPLETE, "--autoscale-min", "3", "--autoscale-max", "2"], {}, "1 <= min <= max",
                 id="autoscale-bounds"),
    pytest.param(["up", *COMPLETE, "--project", "Bad_Name"], {}, "project 'Bad_Name'", id="bad-project"),
    pytest.param(["package", *COMPLETE, "--models", "sd_turbo"], {}, "unknown model(s) sd_turbo", id="unknown-model"),
    pytest.param(["down", "--region", REGION, "--delete-artifacts"], {}, "no S3 bucket configured",
                 id="down-artifacts-no-bucket"),
    # Images by digest: a tag can be moved to other contents.
    pytest.param(["up", *COMPLETE, "--image-uri", f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-studio-triton:25.04-py3-x"],
                 {}, "--image-uri must name the image by digest", id="image-uri-by-tag"),
    pytest.param(["package", "--image", *COMPLETE], {}, "no Triton image digest", id="base-image-without-digest"),
    pytest.param(["package", "--image", *COMPLETE], {"SD_DEPLOY_TRITON_IMAGE_DIGEST": "sha256:abc"},
                 "--triton-image-digest 'sha256:abc': not a digest", id="base-image-digest-malformed"),
    pytest.param(["package", "--image", "--allow-unpinned-images", *COMPLETE],
                 {"SD_DEPLOY_TRITON_IMAGE_DIGEST": "25.04-py3"}, "not a digest", id="malformed-even-when-unpinned-allowed"),
])
def test_bad_configuration_stops_before_any_aws_call(deploy, tripwire, monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = deploy(*argv, "--aws-endpoint-url", tripwire.url)
    assert code == 2 and message in err
    assert tripwire.connections == 0


def test_missing_weights_stop_package_before_any_aws_call(deploy, tripwire, repository):
    (repository / "sd_inpaint/1/checkpoint/model_index.json").unlink()
    code, _, err = deploy("package", *COMPLETE, "--repository", str(repository), "--aws-endpoint-url", tripwire.url)
    assert code == 2
    assert "no weights for sd_inpaint" in err and "python -m deploy weights --tiny" in err
    assert tripwire.connections == 0


def test_package_image_without_docker_stops_before_any_aws_call(deploy, tripwire, repository, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, _, err = deploy("package", "--image", *COMPLETE, "--triton-image-digest", "sha256:" + "a" * 64,
                          "--repository", str(repository), "--aws-endpoint-url", tripwire.url)
    assert code == 1 and "needs the docker CLI" in err and "--image-uri" in err
    assert tripwire.connections == 0


def test_unpinned_images_go_through_only_when_told(deploy, tripwire, repository, monkeypatch, tmp_path):
    # Told, the refusal of the digest's absence goes: the next check (docker) is what stops it.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, _, err = deploy("package", "--image", "--allow-unpinned-images", *COMPLETE, "--repository", str(repository),
                          "--aws-endpoint-url", tripwire.url)
    assert code == 1 and "needs the docker CLI" in err
    by_tag = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/sd-studio-triton:25.04-py3-x"
    code, _, err = deploy("up", *COMPLETE, "--image-uri", by_tag, "--allow-unpinned-images",
                          "--aws-endpoint-url", tripwire.url)
    assert code == 1 and "must name the image by digest" not in err
    assert tripwire.connections >= 1  # past the checks, to its first AWS call


def test_a_refused_image_uri_is_not_repeated(deploy, tripwire):
    code, _, err = deploy("up", *COMPLETE, "--image-uri", f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/x:latest",
                          "--aws-endpoint-url", tripwire.url)
    assert code == 2 and ACCOUNT not in err and "x:latest" not in err


def test_tripwire_does_see_a_request(deploy, tripwire):
    """The control: a valid command reaches the tripwire, so a zero count above means something."""
    code, _, err = deploy("list", "--region", REGION, "--bucket", BUCKET, "--aws-endpoint-url", tripwire.url)
    assert code == 1 and "may not use it (403)" in err
    assert tripwire.connections >= 1


def test_plan_sends_nothing_and_lists_what_is_missing(deploy, tripwire):
    code, out, _ = deploy("--region", REGION, "--aws-endpoint-url", tripwire.url)
    assert code == 0 and tripwire.connections == 0
    for call in ("s3.upload_file(", "sagemaker.create_model(", "sagemaker.create_endpoint_config(",
                 "sagemaker.create_endpoint(", "sagemaker.update_endpoint(", "sagemaker.delete_endpoint(",
                 "ecr.create_repository(", "sagemaker-runtime.invoke_endpoint("):
        assert call in out
    assert "'Mode': 'MultiModel'" in out
    assert "no S3 bucket configured" in out and "no SageMaker execution role" in out


# --- waiting for the endpoint ---------------------------------------------------------------------


def test_wait_prints_status_changes_and_fails_with_the_reason(capsys):
    cfg = DeployConfig(region=REGION, poll_seconds=0.001)
    answers = iter([{"EndpointStatus": "Creating"}] * 3 + [{"EndpointStatus": "Failed", "FailureReason": "image not found"}])
    with pytest.raises(DeployError, match="sd-studio failed: image not found"):
        wait_for_endpoint(cfg, lambda: next(answers))
    out = capsys.readouterr().out
    assert out.count("Creating") == 1, "each status is printed once, when it changes"


def test_wait_returns_when_in_service_and_times_out_otherwise():
    answers = iter([{"EndpointStatus": "Updating"}, {"EndpointStatus": "InService", "EndpointName": "x"}])
    cfg = DeployConfig(region=REGION, poll_seconds=0.001)
    assert wait_for_endpoint(cfg, lambda: next(answers))["EndpointName"] == "x"
    slow = DeployConfig(region=REGION, poll_seconds=0.001, wait_timeout_seconds=0.01)
    with pytest.raises(DeployError, match="still Creating after"):
        wait_for_endpoint(slow, lambda: {"EndpointStatus": "Creating"})


# --- the archives' S3 prefix ------------------------------------------------------------------------

BAD_PREFIXES = {
    "empty": ("", "it is empty"),
    "only-a-slash": ("/", "it is empty"),
    "dot-dot": ("..", "'..' segment"),
    "dot-dot-inside": ("a/../b", "'..' segment"),
    "dot": ("a/./b", "'..' segment"),
    "absolute": ("/x", "starts with '/'"),
    "empty-segment": ("a//b", "empty segment"),
    "backslash": ("a\\b", "contains '\\\\'"),
    "control-character": ("a\x00b", "contains '\\x00'"),
    "newline": ("a\nb", "contains '\\n'"),
    "space": ("a b", "contains ' '"),
    "wildcard": ("a/*", "contains '*'"),
    "too-long": ("a" * 257, "longer than 256"),
}


@pytest.mark.parametrize(("prefix", "reason"), BAD_PREFIXES.values(), ids=BAD_PREFIXES.keys())
@pytest.mark.parametrize("command", ["up", "package", "list", "down"])
def test_a_bad_prefix_stops_every_command_that_uses_it(deploy, tripwire, repository, command, prefix, reason):
    extra = {"up": (), "package": ("--repository", str(repository)), "list": (), "down": ("--delete-artifacts",)}[command]
    code, _, err = deploy(command, *COMPLETE, *extra, "--prefix", prefix, "--aws-endpoint-url", tripwire.url)
    assert code == 2
    assert "--prefix" in err and reason in err, "names the flag and what is wrong"
    assert "the S3 prefix must be one or more segments of letters, digits" in err, "states the rule"
    assert tripwire.connections == 0


def test_an_empty_prefix_is_refused_from_the_environment_and_the_file_too(deploy, tripwire, tmp_path, monkeypatch):
    monkeypatch.setenv("SD_DEPLOY_PREFIX", "")
    code, _, err = deploy("up", *COMPLETE, "--aws-endpoint-url", tripwire.url)
    assert code == 2 and "it is empty" in err
    monkeypatch.delenv("SD_DEPLOY_PREFIX")
    (tmp_path / "deploy.toml").write_text('prefix = ""\n')
    code, _, err = deploy("up", *COMPLETE, "--aws-endpoint-url", tripwire.url)
    assert code == 2 and "it is empty" in err
    assert tripwire.connections == 0


def test_plan_lists_a_bad_prefix_among_the_problems(deploy, tripwire):
    code, out, _ = deploy("plan", *COMPLETE, "--prefix", "a/../b", "--aws-endpoint-url", tripwire.url)
    assert code == 0 and "--prefix 'a/../b'" in out.split("Before these commands can run:")[1]


@pytest.mark.parametrize(("prefix", "key"), [
    ("team/store", "team/store/sd_base.tar.gz"),
    ("team/store/", "team/store/sd_base.tar.gz"),
    ("a.b/c_d-E9", "a.b/c_d-E9/sd_base.tar.gz"),
])
def test_good_prefixes_are_used_as_given(clean_env, prefix, key):
    cfg = load_config(parse("--prefix", prefix, "--bucket", BUCKET), {})
    check_prefix(cfg)
    assert cfg.archive_key("sd_base") == key
    assert cfg.model_data_url == f"s3://{BUCKET}/{key.rsplit('/', 1)[0]}/"


# --- nothing secret in what the commands print ------------------------------------------------------


def test_errors_mask_account_ids_and_access_keys(deploy, clean_env, monkeypatch):
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": (
        "User: arn:aws:iam::123456789012:user/ci is not authorized to perform: sagemaker:CreateModel "
        "(key AKIAIOSFODNN7EXAMPLE)")}}, "CreateModel")

    def refuse(cfg, args):
        raise denied

    monkeypatch.setattr(cli, "run_plan", refuse)
    code, out, err = deploy("plan")
    assert code == 1 and "not authorized to perform: sagemaker:CreateModel" in err
    assert "123456789012" not in out + err and "AKIAIOSFODNN7EXAMPLE" not in out + err
    assert "arn:aws:iam::<account>:user/ci" in err


def test_a_bad_role_arn_is_not_repeated(deploy, tripwire):
    code, _, err = deploy("up", "--region", REGION, "--bucket", BUCKET, "--role-arn", "arn:aws:iam::123456789012:user/x",
                          "--aws-endpoint-url", tripwire.url)
    assert code == 2 and "--role-arn is not an IAM role ARN" in err and "123456789012" not in err
