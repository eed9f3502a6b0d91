"""The run's inputs in the template: each data channel read-only and nothing beside it, each
secret by its exact ARN (and KMS only through its service, for it), nothing for a cluster
without them, the inputs in the payload and no secret anywhere in the synthesized output."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cfn import Synth, assert_lint_clean, synthesized, user_data_text
from userdata.run_inputs import INPUTS_FILE, RunInputs

DATA = "train=s3://my-data/datasets/train/,eval=s3://other-data.example/eval"
SECRETS = "WANDB_API_KEY=/team/wandb-key,DB_URL=secretsmanager:prod/db"
ENV = "WANDB_PROJECT=demo,NCCL_DEBUG=INFO"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory, data=DATA, env=ENV, secrets=SECRETS)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory)


def statements(synth: Synth) -> list[dict[str, Any]]:
    return [
        statement
        for policy in synth.resources("AWS::IAM::Policy").values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def text(value: Any) -> str:
    """An ARN of Fn::Join parts as text, the pseudo parameters by name."""
    if isinstance(value, str):
        return value
    if "Ref" in value:
        return "${" + value["Ref"] + "}"
    if "Fn::Join" in value:
        return "".join(text(part) for part in value["Fn::Join"][1])
    return json.dumps(value)  # an import or a substitution: not ours


def listed(value: Any) -> list[str]:
    return [text(item) for item in (value if isinstance(value, list) else [value])]


def with_action(synth: Synth, action: str) -> list[dict[str, Any]]:
    return [s for s in statements(synth) if action in listed(s["Action"])]


def test_each_channel_is_listed_under_its_prefix_and_read_under_it(inputs: Synth) -> None:
    listings = {
        text(s["Resource"]): s.get("Condition") for s in with_action(inputs, "s3:ListBucket")
    }
    assert listings == {
        "arn:${AWS::Partition}:s3:::my-data": {"StringLike": {"s3:prefix": "datasets/train/*"}},
        "arn:${AWS::Partition}:s3:::other-data.example": {"StringLike": {"s3:prefix": "eval/*"}},
    }
    reads = sorted(r for s in with_action(inputs, "s3:GetObject") for r in listed(s["Resource"]))
    assert reads == [
        "arn:${AWS::Partition}:s3:::my-data/datasets/train/*",
        "arn:${AWS::Partition}:s3:::other-data.example/eval/*",
    ]
    for statement in with_action(inputs, "s3:GetObject"):
        assert listed(statement["Action"]) == ["s3:GetObject"]  # read only, nothing beside


def test_each_secret_is_read_by_its_exact_arn_and_decrypted_only_through_its_service(
    inputs: Synth,
) -> None:
    parameter = (
        "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter/team/wandb-key"
    )
    secret = (
        "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}"
        ":secret:prod/db-??????"
    )
    (get_parameter,) = [
        s for s in with_action(inputs, "ssm:GetParameter") if "team" in str(s["Resource"])
    ]
    assert listed(get_parameter["Action"]) == ["ssm:GetParameter"]
    assert listed(get_parameter["Resource"]) == [parameter]
    (get_secret,) = with_action(inputs, "secretsmanager:GetSecretValue")
    assert listed(get_secret["Resource"]) == [secret]
    decrypts = {
        text(s["Condition"]["StringEquals"]["kms:ViaService"][0]): s
        for s in with_action(inputs, "kms:Decrypt")
    }
    assert set(decrypts) == {
        "ssm.${AWS::Region}.amazonaws.com",
        "secretsmanager.${AWS::Region}.amazonaws.com",
    }
    for service, key, arn in (
        ("ssm", "PARAMETER_ARN", parameter),
        ("secretsmanager", "SecretARN", secret),
    ):
        statement = decrypts[f"{service}.${{AWS::Region}}.amazonaws.com"]
        assert listed(statement["Action"]) == ["kms:Decrypt"]
        assert listed(statement["Resource"]) == [
            "arn:${AWS::Partition}:kms:${AWS::Region}:${AWS::AccountId}:key/*"
        ]
        assert listed(statement["Condition"]["StringLike"][f"kms:EncryptionContext:{key}"]) == [arn]
    assert not [s for s in statements(inputs) if any("*" == a for a in listed(s["Action"]))]


def test_without_inputs_the_role_reads_no_other_bucket_and_no_secret(plain: Synth) -> None:
    actions = {a for s in statements(plain) for a in listed(s["Action"])}
    assert not {"kms:Decrypt", "secretsmanager:GetSecretValue", "s3:ListBucket"} & actions
    resources = " ".join(r for s in statements(plain) for r in listed(s.get("Resource", [])))
    assert "parameter/team" not in resources


def payload_inputs(synth: Synth) -> RunInputs:
    (found,) = list(synth.outdir.glob(f"asset.*/{INPUTS_FILE}"))
    return RunInputs.read(found)


def test_the_payload_carries_the_channels_variables_and_secret_names(
    inputs: Synth, plain: Synth
) -> None:
    shipped = payload_inputs(inputs)
    assert [(c.name, c.uri) for c in shipped.data] == [
        ("train", "s3://my-data/datasets/train/"),
        ("eval", "s3://other-data.example/eval/"),
    ]
    assert shipped.env == {"WANDB_PROJECT": "demo", "NCCL_DEBUG": "INFO"}
    assert [(s.variable, s.service, s.name) for s in shipped.secrets] == [
        ("WANDB_API_KEY", "ssm", "/team/wandb-key"),
        ("DB_URL", "secretsmanager", "prod/db"),
    ]
    assert payload_inputs(plain) == RunInputs()


def test_no_secret_and_no_variable_in_the_template_or_the_user_data(inputs: Synth) -> None:
    """The user data stays the same: the inputs travel in the payload, and a value is never
    known at synth (the nodes read them)."""
    template = inputs.template_path.read_text()
    for value in ("demo", "WANDB_API_KEY", "DB_URL", "NCCL_DEBUG", "WANDB_PROJECT"):
        assert value not in template
    assert "team/wandb-key" not in user_data_text(inputs.launch_template())


def test_cdk_nag_cfn_lint_and_checkov_are_clean(inputs: Synth) -> None:
    assert_lint_clean(inputs)


def test_secrets_given_by_arn_in_another_region_are_granted_there(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shared/hf-AbCdEf"
    partial = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shared/db"  # no suffix
    synth = synthesized(tmp_path_factory, secrets=f"HF_TOKEN={arn},DB={partial}")
    (get_secret,) = with_action(synth, "secretsmanager:GetSecretValue")
    assert sorted(listed(get_secret["Resource"])) == sorted([arn, f"{partial}-??????"])
    (decrypt,) = with_action(synth, "kms:Decrypt")
    assert listed(decrypt["Resource"]) == ["arn:aws:kms:eu-west-1:123456789012:key/*"]
    assert json.dumps(decrypt["Condition"]["StringEquals"]) == json.dumps(
        {"kms:ViaService": ["secretsmanager.eu-west-1.amazonaws.com"]}
    )
    assert synth.violations("AwsSolutions") == []
