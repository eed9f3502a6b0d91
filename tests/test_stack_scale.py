"""The largest cluster (64 nodes) stays inside CloudFormation's and EC2's limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stacks.cluster_app import TEMPLATE_LIMIT_BYTES
from stacks.config import ConfigError
from stacks.user_data import EC2_USER_DATA_LIMIT, LONGEST_RESOLVED_VALUE
from tests.cfn import Synth, user_data_text

# https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/cloudformation-limits.html
TEMPLATE_BYTES_LIMIT = 1_000_000  # a template deployed from S3, as cdk deploy does when large
RESOURCES_LIMIT = 500
OUTPUTS_LIMIT = 200
PARAMETERS_LIMIT = 200


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return Synth(
        tmp_path_factory.mktemp("scale"),
        num_nodes=64,
        accelerator="gpu",
        instance_type="p4d.24xlarge",
        devices_per_node=8,
    )


def test_64_nodes_synthesize_within_cloudformation_limits(synth: Synth) -> None:
    template = synth.template_dict
    assert len(synth.resources("AWS::EC2::Instance")) == 64
    assert len(json.dumps(template).encode()) < TEMPLATE_BYTES_LIMIT
    assert len(template["Resources"]) <= RESOURCES_LIMIT
    assert len(template["Outputs"]) <= OUTPUTS_LIMIT
    assert len(template.get("Parameters", {})) <= PARAMETERS_LIMIT
    assert synth.violations("AwsSolutions") == []


def test_user_data_stays_under_the_ec2_limit(synth: Synth) -> None:
    text = user_data_text(synth.instances_by_rank()[0], placeholder="x" * LONGEST_RESOLVED_VALUE)
    assert len(text.encode()) < EC2_USER_DATA_LIMIT


def test_a_template_over_cloudformations_limit_is_one_line_and_not_left_to_deploy(
    tmp_path: Path,
) -> None:
    """Each node's user data within EC2's 16 KB, 64 of them over CloudFormation's 1 MB: refused
    at synth, not minutes into a deploy."""
    long_args = " ".join(f"--option-{i:04d}=value" for i in range(180))  # ~3.5 KB
    with pytest.raises(ConfigError) as refused:
        Synth(
            tmp_path,
            num_nodes=64,
            accelerator="gpu",
            instance_type="p4d.24xlarge",
            devices_per_node=8,
            script_args=long_args,
        )
    message = str(refused.value)
    assert message.startswith("invalid settings num_nodes=64 with these script_args: ")
    assert f"over CloudFormation's limit of {TEMPLATE_LIMIT_BYTES}" in message
    assert "\n" not in message
    assert not list(tmp_path.glob("*.template.json"))  # nothing the CLI could deploy
