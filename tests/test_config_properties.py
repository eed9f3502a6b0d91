"""Property tests: whatever a cdk.json key holds, the settings load or fail with one line naming
the key. Nothing else (no traceback, no other exception type)."""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stacks.config import SETTINGS, ConfigError, load_config
from stacks.instance_types import GPUS_PER_TYPE
from stacks.user_data import EC2_USER_DATA_LIMIT, LONGEST_RESOLVED_VALUE, render_boot_script
from tests.cfn import Synth, cdk_json_context, user_data_text

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
# What -c key=value can carry: any string, including numbers, CIDRs and paths in disguise.
CLI_STRINGS = (
    st.text()
    | st.from_regex(r"-?\d{1,20}", fullmatch=True)
    | st.sampled_from(
        [
            "0.0.0.0/0",
            "10.0.0.0/33",
            "trainer/../../etc/passwd",
            "true",
            "FALSE",
            "gpu",
            "g5.xlarge",
            "t2.large",
            "",
            " ",
            "nan",
            "1e3",
            "0x10",
            "\uff11\uff12",
        ]  # fullwidth digits
    )
)


def check(key: str, value: Any) -> None:
    try:
        load_config(cdk_json_context(**{key: value}).get)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(("invalid setting ", "missing setting ")), message
        assert key in message, message  # accelerator=gpu with a CPU type names both keys
        assert len(message.splitlines()) == 1


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(SETTINGS), value=JSON_VALUES | CLI_STRINGS)
@example(key="script", value="trainer/\x00train.py")  # a NUL byte once raised ValueError
@example(key="stack_name", value="a\u2028b")
@example(key="num_nodes", value=float("inf"))
@example(key="script_args", value=["--a", 1])
def test_any_value_loads_or_fails_with_one_line_naming_the_key(key: str, value: Any) -> None:
    check(key, value)


# Accepted values of every setting, drawn together: what a user may deploy.
GPU_TYPES = sorted(GPUS_PER_TYPE)
ACCEPTED = st.fixed_dictionaries(
    {
        "num_nodes": st.integers(1, 64),
        "main_port": st.integers(1024, 65535),
        "max_restarts": st.integers(0, 10),
        "max_hours": st.integers(1, 168),
        "stop_when_done": st.booleans(),
        "spot": st.booleans(),
        "recover": st.sampled_from(["auto", "true", "false"]),
        "ssh_cidr": st.sampled_from(["vpc", "203.0.113.7/32", "0.0.0.0/0"]),
        "key_pair": st.sampled_from(["", "my-key"]),
        "stack_name": st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,40}", fullmatch=True),
        # Shell-quoted as a user would (repr is not shell quoting: repr("'\"") is unbalanced).
        "script_args": st.lists(st.text(min_size=1, max_size=30), max_size=8).map(shlex.join),
    }
) | st.fixed_dictionaries(
    {
        "accelerator": st.just("gpu"),
        "instance_type": st.sampled_from(GPU_TYPES),
        "devices_per_node": st.just("auto"),
        "volume_gb": st.sampled_from(["auto", 100, 500]),
        "precision": st.sampled_from(["auto", "32-true", "16-mixed"]),
    }
)


def _render(overrides: dict[str, Any]) -> str:
    config = load_config(cdk_json_context(**overrides).get)
    return render_boot_script(
        config, region="${Token[AWS.Region.1]}", payload_url="s3://b/k.zip", artifacts_bucket="b"
    )


@settings(max_examples=200, deadline=None)
@given(overrides=ACCEPTED)
def test_accepted_values_render_user_data_within_ec2s_limit(overrides: dict[str, Any]) -> None:
    script = _render(overrides)
    assert len(script.replace("${Token[AWS.Region.1]}", "x" * LONGEST_RESOLVED_VALUE).encode()) <= (
        EC2_USER_DATA_LIMIT
    )


def test_script_args_too_long_for_ec2_user_data_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        _render({"script_args": "--note " + "x" * 20_000})
    message = str(error.value)
    assert message.startswith("invalid setting script_args (20007 characters): the user data")
    assert "over EC2's limit of 16384" in message and "\n" not in message


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(overrides=ACCEPTED)
@example(
    overrides={
        "accelerator": "gpu",
        "instance_type": "p5.48xlarge",
        "devices_per_node": "auto",
        "volume_gb": "auto",
        "precision": "auto",
    }
)
def test_a_sample_of_accepted_values_synthesizes(overrides: dict[str, Any]) -> None:
    """The whole app (cdk-nag, CloudFormation validation) on drawn values; few, synths cost."""
    with tempfile.TemporaryDirectory() as outdir:
        synth = Synth(Path(outdir), **overrides)
        # One instance per rank, or (recover) one group of one instance per rank.
        nodes = synth.instances_by_rank() or synth.resources("AWS::AutoScaling::AutoScalingGroup")
        assert len(nodes) == overrides.get("num_nodes", 2)
        text = user_data_text(synth.launch_template(), placeholder="x" * LONGEST_RESOLVED_VALUE)
        assert len(text.encode()) <= EC2_USER_DATA_LIMIT
        assert synth.violations("AwsSolutions") == []
