"""The optional settings in the template: an explicit SSH CIDR (open to the world), a key pair."""

from __future__ import annotations

import pytest

from tests.cfn import Synth, synthesized


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(
        tmp_path_factory,
        ssh_cidr="0.0.0.0/0",
        key_pair="my-key",
        volume_gb="100",
        instance_type="c7i.large",
    )


def test_open_ssh_is_allowed_with_a_warning(synth: Synth) -> None:
    _, group = synth.nodes_security_group()
    assert group["Properties"]["SecurityGroupIngress"][0]["CidrIp"] == "0.0.0.0/0"
    warnings = synth.stack.security_group.node.metadata
    assert any(
        "ssh_cidr=0.0.0.0/0 opens SSH to the whole internet" in str(entry.data)
        for entry in warnings
    )
    assert synth.violations("AwsSolutions") == []


def test_key_pair_volume_and_placement_group(synth: Synth) -> None:
    for node in synth.instances_by_rank():
        props = node["Properties"]
        assert props["KeyName"] == "my-key"
        assert props["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 100
        assert "PlacementGroupName" in props  # c7i supports cluster placement, t2 does not
