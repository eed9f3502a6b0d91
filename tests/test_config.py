"""Every setting: good values in both forms (JSON from cdk.json, strings from -c) and bad ones."""

from __future__ import annotations

from typing import Any

import pytest

from stacks.config import PROJECT_DIR, SETTINGS, ConfigError, check_known_settings, load_config
from stacks.instance_types import (
    GPU_DEFAULT_VOLUME_GB,
    GPU_MIN_VOLUME_GB,
    supports_cluster_placement_group,
)
from tests.cfn import cdk_json_context
from training_project.torch_pins import pinned_version


def load(**overrides: Any):
    context = cdk_json_context(**overrides)
    return load_config(context.get)


def test_defaults_from_cdk_json() -> None:
    config = load()
    assert (config.num_nodes, config.devices_per_node, config.accelerator) == (2, 2, "cpu")
    assert (config.instance_type, config.volume_gb, config.main_port) == ("t2.large", 50, 29400)
    assert config.ssh_cidr is None and config.key_pair is None
    assert config.project == PROJECT_DIR / "trainer" and config.script == "train.py"
    assert config.script_args == () and config.torch_version == pinned_version("torch")
    assert config.stop_when_done is True
    assert config.max_restarts == 3
    assert config.main_address_parameter == "/fabric/FabricCluster/main-address"
    assert config.phase_parameter(3) == "/fabric/FabricCluster/node-3/phase"
    assert not config.supports_cluster_placement_group


@pytest.mark.parametrize(
    ("key", "value", "attribute", "expected"),
    [
        ("num_nodes", "4", "num_nodes", 4),
        ("num_nodes", 64, "num_nodes", 64),
        ("num_nodes", "1", "num_nodes", 1),
        ("devices_per_node", "8", "devices_per_node", 8),
        ("accelerator", "CPU", "accelerator", "cpu"),
        ("volume_gb", "30", "volume_gb", 30),
        ("ssh_cidr", "203.0.113.7/32", "ssh_cidr", "203.0.113.7/32"),
        ("ssh_cidr", "0.0.0.0/0", "ssh_cidr", "0.0.0.0/0"),
        ("key_pair", "my-key", "key_pair", "my-key"),
        ("main_port", "1024", "main_port", 1024),
        ("main_port", 65535, "main_port", 65535),
        ("script", "../trainer/train.py", "script", "train.py"),
        (
            "script_args",
            "--epochs 3 --run-name 'a b'",
            "script_args",
            ("--epochs", "3", "--run-name", "a b"),
        ),
        ("script_args", ["--epochs", "3"], "script_args", ("--epochs", "3")),
        ("stop_when_done", "false", "stop_when_done", False),
        ("stop_when_done", "True", "stop_when_done", True),
        ("stop_when_done", False, "stop_when_done", False),
        ("max_restarts", "0", "max_restarts", 0),
        ("max_restarts", 10, "max_restarts", 10),
        ("instance_type", "C7i.2xlarge", "instance_type", "c7i.2xlarge"),
        ("stack_name", "Team-Run-7", "stack_name", "Team-Run-7"),
    ],
)
def test_good_values(key: str, value: Any, attribute: str, expected: Any) -> None:
    assert getattr(load(**{key: value}), attribute) == expected


def test_gpu_needs_a_gpu_family_and_accepts_one() -> None:
    config = load(accelerator="GPU", instance_type="g5.xlarge", devices_per_node=1)
    assert config.instance_type == "g5.xlarge"
    assert load(accelerator="gpu", instance_type="p4d.24xlarge").supports_cluster_placement_group


def test_gpu_devices_auto_efa_spot_and_max_hours() -> None:
    assert (
        load(
            accelerator="gpu", instance_type="g5.12xlarge", devices_per_node="auto"
        ).devices_per_node
        == 4
    )
    assert (
        load(
            accelerator="gpu", instance_type="p4d.24xlarge", devices_per_node="AUTO"
        ).devices_per_node
        == 8
    )
    config = load(
        accelerator="gpu",
        instance_type="p4d.24xlarge",
        devices_per_node="8",
        efa="true",
        spot="true",
        max_hours="2",
    )
    assert (config.efa, config.spot, config.max_hours) == (True, True, 2)
    defaults = load()
    assert (defaults.efa, defaults.spot, defaults.max_hours) == (False, False, 12)


BAD = [
    ("num_nodes", "0", "from 1 to 64"),
    ("num_nodes", "65", "from 1 to 64"),
    ("num_nodes", "two", "from 1 to 64"),
    ("num_nodes", "2.5", "from 1 to 64"),
    ("num_nodes", 2.0, "from 1 to 64"),
    ("num_nodes", True, "from 1 to 64"),
    ("num_nodes", "", "from 1 to 64"),
    ("devices_per_node", "0", "from 1 to 128"),
    ("devices_per_node", "-2", "from 1 to 128"),
    ("devices_per_node", [2], "from 1 to 128"),
    ("accelerator", "tpu", "one of cpu, gpu"),
    ("accelerator", 1, "one of cpu, gpu"),
    ("instance_type", "large", "EC2 instance type name"),
    ("instance_type", "t2 large", "EC2 instance type name"),
    ("instance_type", "m7g.large", "Graviton"),
    ("volume_gb", "29", "from 30 to 16384"),
    ("volume_gb", "fifty", "from 30 to 16384"),
    ("ssh_cidr", "10.0.0.1", "IPv4 CIDR"),
    ("ssh_cidr", "10.0.0.1/8", "IPv4 CIDR"),
    ("ssh_cidr", "300.0.0.0/8", "IPv4 CIDR"),
    ("ssh_cidr", "::/0", "IPv4 CIDR"),
    ("ssh_cidr", "anywhere", "IPv4 CIDR"),
    ("key_pair", "bad\nname", "key pair"),
    ("key_pair", 7, "key pair"),
    ("main_port", "80", "from 1024 to 65535"),
    ("main_port", "65536", "from 1024 to 65535"),
    ("main_port", "port", "from 1024 to 65535"),
    ("script", "missing.py", "inside the project"),
    ("script", "/etc/passwd", "inside the project"),
    ("script", "../app.py", "inside the project"),
    ("script", ".", "inside the project"),
    ("project", "no-such-folder", "no such folder"),
    ("project", "", "expected a folder"),
    ("project", 3, "expected a folder"),
    ("script_args", "--name 'unclosed", "shell-quoted"),
    ("script_args", 5, "shell-quoted"),
    ("stop_when_done", "yes", "true or false"),
    ("stop_when_done", 1, "true or false"),
    ("max_restarts", "-1", "from 0 to 10"),
    ("max_restarts", "11", "from 0 to 10"),
    ("max_restarts", "three", "from 0 to 10"),
    ("max_hours", "0", "from 1 to 168"),
    ("max_hours", "169", "from 1 to 168"),
    ("max_hours", "1.5", "from 1 to 168"),
    ("spot", "maybe", "true or false"),
    ("shared_fs", "nfs", "expected one of efs, none"),
    ("shared_fs", "", "expected one of efs, none"),
    ("efa", "on", "true or false"),
    ("efa", "true", "t2.large has no EFA"),
    ("devices_per_node", "auto", "auto needs accelerator=gpu and a GPU type it knows"),
    ("stack_name", "1stack", "CloudFormation stack name"),
    ("stack_name", "my_stack", "CloudFormation stack name"),
    ("precision", "16-mixed", "expected auto or one of 64-true, 32-true, bf16-mixed, bf16-true"),
    ("precision", "fp8", "expected auto or one of"),
    ("precision", 32, "expected auto or one of"),
    ("ami", "ami-123", "an id like ami-0abc"),
    ("ami", "ubuntu", "an id like ami-0abc"),
    ("instance_type", "p3.2xlarge", "V100 (Volta) GPUs, which the Deep Learning AMI's drivers"),
    ("instance_type", "p3dn.24xlarge", "Turing or newer"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD)
def test_bad_values_name_key_value_and_what_is_allowed(key: str, value: Any, allowed: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(**{key: value})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"invalid setting {key}={value!r}: ")
    assert allowed in message


GPU = {"accelerator": "gpu", "devices_per_node": "1"}


@pytest.mark.parametrize(
    ("overrides", "precision"),
    [
        ({}, "32-true"),
        ({"precision": "bf16-mixed"}, "bf16-mixed"),
        ({**GPU, "instance_type": "g5.xlarge"}, "bf16-mixed"),
        ({**GPU, "instance_type": "g6e.xlarge"}, "bf16-mixed"),
        ({**GPU, "instance_type": "p5.48xlarge"}, "bf16-mixed"),
        ({**GPU, "instance_type": "g4dn.xlarge"}, "16-mixed"),
        ({**GPU, "instance_type": "g4dn.xlarge", "precision": "32-true"}, "32-true"),
        ({**GPU, "instance_type": "g5.xlarge", "precision": "16-MIXED"}, "16-mixed"),
    ],
)
def test_precision_auto_follows_the_hardware(overrides: dict[str, Any], precision: str) -> None:
    assert load(**overrides).precision == precision


def test_bf16_on_a_t4_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError) as error:
        load(**GPU, instance_type="g4dn.xlarge", precision="bf16-mixed")
    assert str(error.value).startswith(
        "invalid setting precision='bf16-mixed': the T4 of g4dn.xlarge has no bfloat16; "
    )


def test_gpu_volume_defaults_to_and_needs_room_for_the_deep_learning_ami() -> None:
    assert load(**GPU, instance_type="g5.xlarge").volume_gb == GPU_DEFAULT_VOLUME_GB
    assert load(**GPU, instance_type="g5.xlarge", volume_gb="100").volume_gb == GPU_MIN_VOLUME_GB
    assert load(volume_gb="auto").volume_gb == 50
    with pytest.raises(ConfigError) as error:
        load(**GPU, instance_type="g5.xlarge", volume_gb="50")
    assert str(error.value) == (
        "invalid setting volume_gb='50': accelerator=gpu needs 100 to 16384 GB "
        "(the Deep Learning AMI, CUDA torch and caches), or auto"
    )


def test_ami_setting_is_optional_and_normalized() -> None:
    assert load().ami is None
    assert load(ami="ami-0ABCDEF0123456789").ami == "ami-0abcdef0123456789"
    assert load(ami="ami-12345678").ami == "ami-12345678"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["num_node"], "unknown setting num_node: did you mean num_nodes?"),
        (["instance-type"], "unknown setting instance-type: did you mean instance_type?"),
        (["zzz"], "unknown setting zzz: settings: stack_name, num_nodes, "),
    ],
)
def test_unknown_setting_is_one_line_with_the_closest_name(keys: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_known_settings([*SETTINGS, *keys])
    assert str(error.value).startswith(message)


def test_cdk_keys_are_not_settings() -> None:
    check_known_settings(
        [
            *cdk_json_context(),
            "aws:cdk:enable-path-metadata",
            "ssm:account=1:parameterName=/x:region=us-east-1",
            "@aws-cdk/core:newStyleStackSynthesis",
        ]
    )


def test_placement_groups_follow_aws_support_list() -> None:
    supported = ["c7i.2xlarge", "p4d.24xlarge", "g5.xlarge", "c4.8xlarge", "m4.large", "a1.large"]
    refused = ["t3.large", "t2.large", "mac1.metal", "m7i-flex.large", "m3.large", "p2.xlarge"]
    assert all(supports_cluster_placement_group(t) for t in supported)
    assert not any(supports_cluster_placement_group(t) for t in refused)


def test_cpu_instance_type_refused_for_gpu() -> None:
    with pytest.raises(ConfigError, match=r"instance_type='t2.large': accelerator=gpu needs"):
        load(accelerator="gpu")


@pytest.mark.parametrize("instance_type", ["g5.xlarge", "p4d.24xlarge", "G6e.12xlarge"])
def test_gpu_instance_type_refused_for_cpu(instance_type: str) -> None:
    """GPU prices for a CPU run (the plain AMI, CPU torch): never by accident."""
    family = instance_type.lower().split(".")[0]
    with pytest.raises(ConfigError) as error:
        load(instance_type=instance_type)  # accelerator=cpu, the default
    assert str(error.value) == (
        f"invalid setting instance_type={instance_type!r}: {family} is a GPU type, but "
        "accelerator=cpu would train on its CPUs at GPU prices (with the plain AMI and CPU "
        "torch): pass -c accelerator=gpu, or pick a CPU type such as c7i.2xlarge"
    )


@pytest.mark.parametrize("value", ["FabricCluster", "9storage", "with space", ""])
def test_a_storage_stack_is_a_stack_name_other_than_the_clusters(value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(storage_stack=value)
    assert str(error.value).startswith(f"invalid setting storage_stack={value!r}: expected the")
    assert "not the cluster's own stack_name" in str(error.value)
    assert load(storage_stack="TeamStorage").storage_stack == "TeamStorage"


def test_missing_setting_says_where_to_set_it() -> None:
    context = cdk_json_context()
    del context["num_nodes"]
    with pytest.raises(ConfigError, match=r"missing setting num_nodes: set it in cdk.json"):
        load_config(context.get)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"accelerator": "gpu", "instance_type": "g5.xlarge", "devices_per_node": "2"},
            "invalid setting devices_per_node='2': g5.xlarge has 1 GPU(s): expected 1 to 1 or auto",
        ),
        (
            {
                "accelerator": "gpu",
                "instance_type": "g5.2xlarge",
                "devices_per_node": "1",
                "efa": True,
            },
            "invalid setting efa=True: g5.2xlarge has no EFA; EFA types: ",
        ),
    ],
)
def test_gpu_cross_checks(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(**overrides)
    assert str(error.value).startswith(message)


SPOT_GROUPS = {"spot": True, "recover": True, "efa": False}


@pytest.mark.parametrize(
    ("value", "accelerator", "instance_type", "expected"),
    [
        ("", "cpu", "c7i.2xlarge", ("c7i.2xlarge",)),
        ("c6i.2xlarge, C7a.2xlarge", "cpu", "c7i.2xlarge",
         ("c7i.2xlarge", "c6i.2xlarge", "c7a.2xlarge")),
        (["p5en.48xlarge", "p5e.48xlarge"], "gpu", "p5e.48xlarge",
         ("p5e.48xlarge", "p5en.48xlarge")),
        ("p4de.24xlarge", "gpu", "p4d.24xlarge", ("p4d.24xlarge", "p4de.24xlarge")),
    ],
)  # fmt: skip
def test_instance_types_start_with_instance_type(
    value: Any, accelerator: str, instance_type: str, expected: tuple[str, ...]
) -> None:
    from stacks.setting_checks import instance_types_setting

    found = instance_types_setting(value, accelerator, instance_type, **SPOT_GROUPS)
    assert found == expected


@pytest.mark.parametrize(
    ("value", "accelerator", "instance_type", "groups", "allowed"),
    [
        ("c6i.2xlarge", "cpu", "c7i.2xlarge", {"spot": False, "recover": False},
         "needs spot=true and recover=true"),
        ("c6i.2xlarge", "cpu", "c7i.2xlarge", {"spot": True, "recover": False},
         "needs spot=true and recover=true"),
        ("g5.xlarge", "cpu", "c7i.2xlarge", {}, "g5.xlarge: g5 is a GPU type"),
        ("large", "cpu", "c7i.2xlarge", {}, "large: expected an EC2 instance type name"),
        ("g6.xlarge", "gpu", "g5.12xlarge", {}, "g6.xlarge must have the GPUs of g5.12xlarge"),
        ("g6.12xlarge", "gpu", "g5.12xlarge", {}, "the same model and count"),
        ("c6i.2xlarge", "gpu", "g5.12xlarge", {}, "c6i.2xlarge: accelerator=gpu needs an NVIDIA"),
        ("p5.48xlarge", "gpu", "p4d.24xlarge", {"efa": True}, "must have the GPUs of p4d"),
        ("g6e.12xlarge", "gpu", "g6.12xlarge", {}, "must have the GPUs of g6.12xlarge"),
        (7, "cpu", "c7i.2xlarge", {}, "instance types separated by commas"),
    ],
)  # fmt: skip
def test_bad_instance_types_name_the_type_and_what_is_allowed(
    value: Any, accelerator: str, instance_type: str, groups: dict[str, bool], allowed: str
) -> None:
    from stacks.setting_checks import instance_types_setting

    with pytest.raises(ConfigError) as error:
        instance_types_setting(value, accelerator, instance_type, **(SPOT_GROUPS | groups))
    message = str(error.value)
    assert message.startswith(f"invalid setting instance_types={value!r}: "), message
    assert allowed in message and "\n" not in message


@pytest.mark.parametrize(
    ("value", "spot", "expected"),
    [("auto", True, True), ("auto", False, False), ("true", False, True), (False, True, False)],
)
def test_recover_is_auto_with_spot(value: Any, spot: bool, expected: bool) -> None:
    from stacks.setting_checks import recover_setting

    assert recover_setting(value, spot) is expected


@pytest.mark.parametrize("value", ["yes", "", 1, None])
def test_a_bad_recover_is_one_line(value: Any) -> None:
    from stacks.setting_checks import recover_setting

    with pytest.raises(ConfigError, match=r"^invalid setting recover=.*: expected auto \(true"):
        recover_setting(value, True)
