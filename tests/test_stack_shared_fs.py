"""The shared run directory (shared_fs=efs, the default): one encrypted EFS file system per
cluster, reachable over NFS from the nodes only, mounted by every node before its agent starts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cfn import Synth, synthesized, user_data_text


@pytest.fixture(scope="module")
def efs(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory, shared_fs="none")


def only(synth: Synth, resource_type: str) -> tuple[str, dict[str, Any]]:
    ((logical_id, resource),) = synth.resources(resource_type).items()
    return logical_id, resource


def test_one_encrypted_elastic_file_system_that_goes_with_the_cluster(efs: Synth) -> None:
    _, file_system = only(efs, "AWS::EFS::FileSystem")
    properties = file_system["Properties"]
    assert properties["Encrypted"] is True
    assert properties["ThroughputMode"] == "elastic"
    assert properties["PerformanceMode"] == "generalPurpose"
    assert "FileSystemPolicy" not in properties  # plain NFS: the security group decides
    assert file_system["DeletionPolicy"] == "Delete"  # the runs outlive it in S3


def test_nfs_reaches_it_from_the_nodes_only(efs: Synth) -> None:
    file_system_id, _ = only(efs, "AWS::EFS::FileSystem")
    _, target = only(efs, "AWS::EFS::MountTarget")
    assert target["Properties"]["FileSystemId"] == {"Ref": file_system_id}
    ((subnet_id, _),) = efs.resources("AWS::EC2::Subnet").items()
    assert target["Properties"]["SubnetId"] == {"Ref": subnet_id}
    (group,) = target["Properties"]["SecurityGroups"]
    group_id = group["Fn::GetAtt"][0]
    rules = [
        rule["Properties"]
        for rule in efs.resources("AWS::EC2::SecurityGroupIngress").values()
        if rule["Properties"]["GroupId"] == {"Fn::GetAtt": [group_id, "GroupId"]}
    ]
    inline = efs.template_dict["Resources"][group_id]["Properties"].get("SecurityGroupIngress")
    assert not inline
    (rule,) = rules
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 2049, 2049)
    for node in efs.instances_by_rank():  # the one source: the group every node is in
        assert node["Properties"]["SecurityGroupIds"] == [rule["SourceSecurityGroupId"]]
    egress = efs.template_dict["Resources"][group_id]["Properties"]["SecurityGroupEgress"]
    assert [e["CidrIp"] for e in egress] == ["255.255.255.255/32"]  # CDK's "no egress" rule


def test_every_node_waits_for_the_mount_target_and_mounts_it(efs: Synth) -> None:
    target_id, _ = only(efs, "AWS::EFS::MountTarget")
    file_system_id, _ = only(efs, "AWS::EFS::FileSystem")
    for node in efs.instances_by_rank():
        assert target_id in node["DependsOn"]
    text = user_data_text(efs.launch_template(), placeholder="TOKEN")
    assert "readonly SHARED_FS='TOKEN.efs.TOKEN.TOKEN'" in text
    assert "readonly SHARED_MOUNT=/mnt/fabric-shared" in text
    parts = json.dumps(efs.launch_template()["Properties"]["LaunchTemplateData"]["UserData"])
    assert json.dumps({"Ref": file_system_id}) in parts


def test_the_node_role_gets_no_file_system_permission(efs: Synth) -> None:
    policies = json.dumps(efs.resources("AWS::IAM::Policy")) + json.dumps(
        efs.resources("AWS::IAM::Role")
    )
    assert "elasticfilesystem" not in policies


def test_shared_fs_none_keeps_the_run_on_each_nodes_disk(disks: Synth) -> None:
    assert disks.resources("AWS::EFS::FileSystem") == {}
    assert disks.resources("AWS::EFS::MountTarget") == {}
    text = user_data_text(disks.launch_template())
    assert "readonly SHARED_FS=''" in text
    for node in disks.instances_by_rank():
        assert not any("MountTarget" in d for d in node.get("DependsOn", []))
