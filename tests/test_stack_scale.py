"""The largest cluster (64 nodes) stays inside CloudFormation's and EC2's limits."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pytest

from stacks.cluster_app import TEMPLATE_LIMIT_BYTES, build_app, cdk_json_context, synthesize
from stacks.config import ConfigError
from stacks.user_data import EC2_USER_DATA_LIMIT, LONGEST_RESOLVED_VALUE
from tests.cfn import Synth, synthesized, user_data_text

# https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/cloudformation-limits.html
RESOURCES_LIMIT = 500
OUTPUTS_LIMIT = 200
PARAMETERS_LIMIT = 200


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(
        tmp_path_factory,
        num_nodes=64,
        accelerator="gpu",
        instance_type="p4d.24xlarge",
        devices_per_node=8,
    )


def test_64_nodes_synthesize_within_cloudformation_limits(synth: Synth) -> None:
    template = synth.template_dict
    assert len(synth.resources("AWS::EC2::Instance")) == 64
    # The user data once (the launch template), not 64 times: far below the limit.
    assert synth.template_path.stat().st_size < TEMPLATE_LIMIT_BYTES / 4
    assert len(template["Resources"]) <= RESOURCES_LIMIT
    assert len(template["Outputs"]) <= OUTPUTS_LIMIT
    assert len(template.get("Parameters", {})) <= PARAMETERS_LIMIT
    assert synth.violations("AwsSolutions") == []


def test_user_data_stays_under_the_ec2_limit(synth: Synth) -> None:
    text = user_data_text(synth.launch_template(), placeholder="x" * LONGEST_RESOLVED_VALUE)
    assert len(text.encode()) < EC2_USER_DATA_LIMIT


def test_a_template_over_cloudformations_limit_is_one_line_and_not_left_to_deploy(
    tmp_path: Path,
) -> None:
    """Refused at synth, not minutes into a deploy; no template is left for the CLI."""
    app, stack = build_app(cdk_json_context(num_nodes=2), outdir=str(tmp_path))
    with patch("stacks.cluster_app.TEMPLATE_LIMIT_BYTES", 10_000):
        with pytest.raises(ConfigError) as refused:
            synthesize(app, stack)
    message = str(refused.value)
    assert message.startswith("invalid settings num_nodes=2 with these script_args: ")
    assert "over CloudFormation's limit of 10000" in message and "\n" not in message
    assert not list(tmp_path.glob("*.template.json"))  # nothing the CLI could deploy
