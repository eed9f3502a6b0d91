"""The data, env and secrets settings: their forms (a string from -c, JSON from cdk.json) and
one line for each bad value, naming the setting and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from stacks.config import ConfigError, load_config
from tests.cfn import cdk_json_context
from userdata.run_inputs import DataChannel, RunInputs, SecretRef


def inputs(**overrides: Any) -> RunInputs:
    return load_config(cdk_json_context(**overrides).get).inputs


def test_none_by_default() -> None:
    assert inputs() == RunInputs()


@pytest.mark.parametrize(
    ("value", "channels"),
    [
        ("s3://bucket-1/datasets/mnist", [DataChannel("data", "bucket-1", "datasets/mnist/")]),
        ("s3://bucket-1", [DataChannel("data", "bucket-1", "")]),
        ("s3://bkt/year=2024/", [DataChannel("data", "bkt", "year=2024/")]),
        (
            "train=s3://a.b-c/x/,eval=s3://a.b-c/y",
            [DataChannel("train", "a.b-c", "x/"), DataChannel("eval", "a.b-c", "y/")],
        ),
        ({"train": "s3://bkt/t/"}, [DataChannel("train", "bkt", "t/")]),
    ],
)
def test_data_channels(value: Any, channels: list[DataChannel]) -> None:
    assert list(inputs(data=value).data) == channels


def test_env_in_both_forms_and_values_with_commas_and_equals() -> None:
    assert inputs(env="A=1,B=x,y,C=a=b").env == {"A": "1", "B": "x,y", "C": "a=b"}
    assert inputs(env={"HF_HOME": "/opt/hf", "LIST": "a,b"}).env == {
        "HF_HOME": "/opt/hf",
        "LIST": "a,b",
    }


def test_secret_references() -> None:
    arn = "arn:aws:ssm:eu-west-1:123456789012:parameter/x/y"
    found = inputs(secrets=f"A=/team/key,B=ssm:plain-name,C=secretsmanager:prod/db,D={arn}").secrets
    assert found == (
        SecretRef("A", "ssm", "/team/key"),
        SecretRef("B", "ssm", "plain-name"),
        SecretRef("C", "secretsmanager", "prod/db"),
        SecretRef("D", "ssm", arn),
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data", "https://bucket/x", "is not an S3 location"),
        ("data", "gs://bucket/x", "is not an S3 location"),
        ("data", "s3://Bad_Bucket/x", "is not an S3 bucket name"),
        ("data", "s3://192.168.1.1/x", "is not an S3 bucket name"),
        ("data", "s3://bucket/data/*", "must not hold *"),
        ("data", "s3://bucket/a/../b", "must not start with /"),
        ("data", "train=s3://bkt/a,train=s3://bkt/b", "channel train is given twice"),
        ("data", "bad name=s3://bkt/a", "is not a channel name"),
        ("data", "train:s3://bkt/a", "is not an S3 location"),
        ("env", "1X=2", "is not a variable name"),
        ("env", "OMP_NUM_THREADS=4", "OMP_NUM_THREADS is set by the node agent or fabric run"),
        ("env", "FABRIC_RUN_DIR=/x", "is set by the node agent"),
        ("env", "MASTER_ADDR=1.2.3.4", "is set by the node agent"),
        ("env", "A=1,A=2", "A is given twice"),
        ("env", "novalue", "is not NAME=VALUE"),
        ("env", 3, "expected NAME=VALUE"),
        ("secrets", "KEY=wandb", "expected a SecureString parameter"),
        ("secrets", "KEY=/aws/service/x", "not under aws or ssm"),
        ("secrets", "KEY=secretsmanager:bad name", "expected a SecureString parameter"),
        ("secrets", "RANK=/team/key", "RANK is set by the node agent"),
    ],
)
def test_bad_values_are_one_line_naming_the_setting(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        inputs(**{key: value})
    text = str(error.value)
    assert text.startswith(f"invalid setting {key}=") and "\n" not in text
    assert message in text


def test_a_variable_is_in_env_or_in_secrets_not_both() -> None:
    with pytest.raises(ConfigError, match="WANDB_API_KEY is given twice"):
        inputs(env="WANDB_API_KEY=x", secrets="WANDB_API_KEY=/team/key")


def test_inputs_round_trip_through_the_payload_file() -> None:
    found = inputs(data="t=s3://bkt/t/", env="A=1", secrets="K=/team/key")
    assert RunInputs.from_json(found.to_json()) == found
