"""`python -m deploy policy`: the IAM policies, generated from the configuration, checked as JSON,
against the calls `plan` shows, and against the copies in docs/deploy.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sdserve.catalog import MODELS

from serving.archive import archive_name
from deploy.policy import POLICIES, WHY_UNSCOPED
from tests.deploy_support import BUCKET, REGION


POLICY_DOC = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
ACCOUNT = "111122223333"
# The heading in POLICY_DOC each generated policy is copied under.
POLICY_HEADINGS = {
    "deployer": "### Who runs `python -m deploy`",
    "execution-role": "### The SageMaker execution role",
    "studio": "### The studio's IAM user",
}


def policy(deploy, principal: str, *args: str) -> dict:
    code, out, err = deploy("policy", principal, *args)
    assert code == 0, err
    return json.loads(out)


def statements(document: dict) -> dict[str, dict]:
    return {statement["Sid"]: statement for statement in document["Statement"]}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("principal", sorted(POLICIES))
def test_every_policy_is_valid_json_with_unique_allow_statements(deploy, clean_env, principal):
    document = policy(deploy, principal)
    assert document["Version"] == "2012-10-17"
    sids = [statement["Sid"] for statement in document["Statement"]]
    assert len(sids) == len(set(sids)) and all(re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids)
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        assert all(re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9]+", action) for action in as_list(statement["Action"]))


@pytest.mark.parametrize("principal", sorted(POLICIES))
def test_star_resources_only_where_no_resource_level_permission_exists(deploy, clean_env, principal):
    for sid, statement in statements(policy(deploy, principal)).items():
        if "*" in as_list(statement["Resource"]):
            assert sid in WHY_UNSCOPED, f"{sid} grants on every resource"


def test_the_deployers_alarm_permissions_are_scoped_to_the_endpoints_alarms(deploy, clean_env):
    alarms = statements(policy(deploy, "deployer", "--region", REGION, "--account", ACCOUNT))["AutoscalingAlarms"]
    assert "cloudwatch:DeleteAlarms" in alarms["Action"]
    assert alarms["Resource"] == (f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:"
                                  "TargetTracking-endpoint/sd-studio/variant/AllTraffic-*")
    other = statements(policy(deploy, "deployer", "--project", "team-a"))["AutoscalingAlarms"]
    assert other["Resource"].endswith(":alarm:TargetTracking-endpoint/team-a/variant/AllTraffic-*")


def test_the_studio_may_only_invoke_the_model_tables_archives_on_its_endpoint(deploy, clean_env):
    document = policy(deploy, "studio", "--region", REGION, "--account", ACCOUNT)
    (statement,) = document["Statement"]
    assert statement["Action"] == "sagemaker:InvokeEndpoint"
    assert statement["Resource"] == f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/sd-studio"
    (operator,) = statement["Condition"]
    assert operator == "StringEquals", "exact archive names: no wildcard reaches other archives under the prefix"
    allowed = statement["Condition"]["StringEquals"]["sagemaker:TargetModel"]
    assert sorted(allowed) == sorted(archive_name(model) for model in MODELS)


def test_policies_follow_project_prefix_models_bucket_and_partition(deploy, clean_env):
    args = ("--project", "team-a", "--prefix", "shared/team-a/", "--bucket", BUCKET, "--region", "cn-north-1")
    deployer = statements(policy(deploy, "deployer", *args))
    assert deployer["WriteArchives"]["Resource"] == f"arn:aws-cn:s3:::{BUCKET}/shared/team-a/*.tar.gz"
    assert "arn:aws-cn:sagemaker:cn-north-1:ACCOUNT:endpoint/team-a" in deployer["SageMakerResources"]["Resource"]
    execution = statements(policy(deploy, "execution-role", *args))
    assert execution["ListArchives"]["Condition"] == {"StringLike": {"s3:prefix": "shared/team-a/*"}}
    (studio,) = policy(deploy, "studio", *args, "--models", "sd_base")["Statement"]
    assert studio["Condition"]["StringEquals"]["sagemaker:TargetModel"] == [archive_name("sd_base")]


# IAM action names of the boto3 operations whose names differ (the rest: CamelCase of the method).
S3_ACTIONS = {"head_bucket": "ListBucket", "head_object": "GetObject", "upload_file": "PutObject",
              "list_objects_v2": "ListBucket", "delete_objects": "DeleteObject"}


def iam_action(service: str, operation: str) -> str:
    prefix = {"sagemaker-runtime": "sagemaker"}.get(service, service)
    name = S3_ACTIONS[operation] if service == "s3" else "".join(part.title() for part in operation.split("_"))
    return f"{prefix}:{name}"


def test_the_deployer_policy_allows_every_call_plan_shows(deploy, clean_env):
    code, out, _ = deploy("plan", "--region", REGION, "--bucket", BUCKET)
    assert code == 0
    planned = {iam_action(*match) for match in re.findall(r"^\s+([a-z0-9-]+)\.([a-z0-9_]+)\(", out, re.MULTILINE)}
    assert len(planned) > 20
    allowed = {action for statement in policy(deploy, "deployer")["Statement"] for action in as_list(statement["Action"])}
    assert planned - allowed == set()


@pytest.mark.parametrize("principal", sorted(POLICIES))
def test_the_deploy_doc_shows_the_generated_policies(deploy, clean_env, principal):
    text = POLICY_DOC.read_text()
    section = text[text.index(POLICY_HEADINGS[principal]):]
    block = section[section.index("```json\n") + len("```json\n"):]
    assert json.loads(block[:block.index("```")]) == policy(deploy, principal)


def test_policy_sends_nothing_and_checks_its_account(deploy, tripwire):
    code, _, _ = deploy("policy", "studio", "--region", REGION, "--aws-endpoint-url", tripwire.url)
    assert code == 0 and tripwire.connections == 0
    code, _, err = deploy("policy", "studio", "--account", "12345")
    assert code == 2 and "12-digit" in err
    code, _, err = deploy("policy", "deployer", "--prefix", "a/../b")
    assert code == 2 and "--prefix" in err


RESULTS_BUCKET = "sd-studio-results"


def test_the_studio_may_keep_results_only_under_its_prefix_and_only_when_given_a_bucket(deploy, clean_env):
    """`--results-bucket` (the studio's S3 results store, studio/bucket_store.py) adds exactly the
    calls that store makes, on that bucket and prefix; without it the policy is InvokeEndpoint alone."""
    assert [statement["Sid"] for statement in policy(deploy, "studio")["Statement"]] == ["InvokeStudioModels"]
    found = statements(policy(deploy, "studio", "--results-bucket", RESULTS_BUCKET, "--region", "cn-north-1"))
    assert set(found) == {"InvokeStudioModels", "StudioResults", "ListStudioResults"}
    objects, listing = found["StudioResults"], found["ListStudioResults"]
    assert sorted(objects["Action"]) == ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    assert objects["Resource"] == f"arn:aws-cn:s3:::{RESULTS_BUCKET}/sd-studio/results/*" and "Condition" not in objects
    assert listing["Action"] == "s3:ListBucket" and listing["Resource"] == f"arn:aws-cn:s3:::{RESULTS_BUCKET}"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": "sd-studio/results/*"}}
    other = statements(policy(deploy, "studio", "--results-bucket", RESULTS_BUCKET, "--project", "team-a",
                              "--results-prefix", "shared/team-a-results/"))
    assert other["StudioResults"]["Resource"] == f"arn:aws:s3:::{RESULTS_BUCKET}/shared/team-a-results/*"
    assert other["ListStudioResults"]["Condition"] == {"StringLike": {"s3:prefix": "shared/team-a-results/*"}}


@pytest.mark.parametrize("setting", [("--results-prefix", "a/../b"), ("--results-prefix", ""),
                                     ("--results-bucket", "Not_A_Bucket")])
def test_a_bad_results_bucket_or_prefix_is_refused(deploy, clean_env, setting):
    code, _, err = deploy("policy", "studio", "--results-bucket", RESULTS_BUCKET, *setting)
    assert code == 2 and setting[0] in err


def test_the_deploy_doc_shows_the_results_statements(deploy, clean_env):
    text = POLICY_DOC.read_text()
    section = text[text.index("With `--results-bucket BUCKET`"):]
    block = section[section.index("```json\n") + len("```json\n"):]
    shown = json.loads(block[:block.index("```")].replace("arn:aws:s3:::BUCKET", f"arn:aws:s3:::{RESULTS_BUCKET}"))
    assert shown == policy(deploy, "studio", "--results-bucket", RESULTS_BUCKET)["Statement"][1:]
