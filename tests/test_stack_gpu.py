"""GPU clusters in the template: the Deep Learning AMI, devices=auto, EFA, spot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stacks.instance_types import GPU_DEFAULT_VOLUME_GB
from stacks.nodes import GPU_AMI_PARAMETER
from tests.cfn import Synth, checkov, synthesized, user_data_text

CASES: dict[str, dict[str, Any]] = {
    # 4 GPUs per g5.12xlarge, found by devices_per_node=auto
    "g5-12xlarge-auto": {
        "accelerator": "gpu",
        "instance_type": "g5.12xlarge",
        "devices_per_node": "auto",
    },
    "p4d-efa-spot": {
        "accelerator": "gpu",
        "instance_type": "p4d.24xlarge",
        "devices_per_node": "auto",
        "efa": "true",
        "spot": "true",
        "recover": "false",  # the instance shape (auto: groups with spot; test_stack_recover.py)
        "num_nodes": 3,
    },
}


@pytest.fixture(scope="module", params=list(CASES))
def synth(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synth:
    synth = synthesized(tmp_path_factory, **CASES[request.param])
    synth.case = request.param  # type: ignore[attr-defined]
    return synth


def case(synth: Synth) -> str:
    return synth.case  # type: ignore[attr-defined]


def test_gpu_nodes_use_the_deep_learning_ami_in_a_placement_group(synth: Synth) -> None:
    nodes = synth.instances_by_rank()
    parameter = synth.template_dict["Parameters"][nodes[0]["Properties"]["ImageId"]["Ref"]]
    assert parameter["Default"] == GPU_AMI_PARAMETER
    ((group_id, group),) = synth.resources("AWS::EC2::PlacementGroup").items()
    assert group["Properties"]["Strategy"] == "cluster"
    assert all(
        n["Properties"]["PlacementGroupName"] == {"Fn::GetAtt": [group_id, "GroupName"]}
        for n in nodes
    )


def test_devices_auto_is_the_gpu_count(synth: Synth) -> None:
    text = user_data_text(synth.launch_template())
    expected = {"g5-12xlarge-auto": 4, "p4d-efa-spot": 8}[case(synth)]
    assert f"readonly DEVICES_PER_NODE={expected}\n" in text
    assert "readonly ACCELERATOR=gpu\n" in text
    efa = "true" if case(synth) == "p4d-efa-spot" else "false"
    assert f"readonly EFA={efa}\n" in text and "[[ $EFA == true ]] && efa_flag=(--efa)" in text
    # p4d's EFA device has RDMA (GPUDirect); the agent sets FI_EFA_USE_DEVICE_RDMA only then.
    assert f"readonly EFA_RDMA={efa}\n" in text
    assert "[[ $EFA_RDMA == true ]] && efa_flag+=(--efa-rdma)" in text
    assert "readonly PRECISION=bf16-mixed\n" in text


def test_efa_interfaces_and_all_traffic_within_the_group(synth: Synth) -> None:
    group_id, group = synth.nodes_security_group()
    rules = synth.ingress_rules(group_id)
    assert len(rules) == 1 and rules[0]["SourceSecurityGroupId"] == {
        "Fn::GetAtt": [group_id, "GroupId"]
    }
    egress = group["Properties"]["SecurityGroupEgress"]
    templates = synth.resources("AWS::EC2::LaunchTemplate")
    if case(synth) == "p4d-efa-spot":
        assert rules[0]["IpProtocol"] == "-1"  # all traffic, not only TCP, inbound
        assert egress == [
            {
                "CidrIp": "0.0.0.0/0",
                "Description": "Allow all outbound traffic by default",
                "IpProtocol": "-1",
            }
        ]
        # 0.0.0.0/0 does not cover EFA: the group itself is an egress rule of its own.
        (own,) = [
            r["Properties"] for r in synth.resources("AWS::EC2::SecurityGroupEgress").values()
        ]
        assert own["IpProtocol"] == "-1"
        assert own["GroupId"] == own["DestinationSecurityGroupId"]
        assert own["GroupId"] == {"Fn::GetAtt": [group_id, "GroupId"]}
        ((template_id, template),) = templates.items()
        (interface,) = template["Properties"]["LaunchTemplateData"]["NetworkInterfaces"]
        assert interface["InterfaceType"] == "efa"
        assert interface["Groups"] == [{"Fn::GetAtt": [group_id, "GroupId"]}]
        for node in synth.instances_by_rank():
            props = node["Properties"]
            assert props["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": template_id}
            assert "SubnetId" not in props and "SecurityGroupIds" not in props
    else:
        assert rules[0]["IpProtocol"] == "tcp"
        # The one launch template (it carries the user data) has no EFA interface.
        ((_, template),) = templates.items()
        assert "NetworkInterfaces" not in template["Properties"]["LaunchTemplateData"]
        assert synth.resources("AWS::EC2::SecurityGroupEgress") == {}


def test_spot_is_a_one_time_request_that_terminates(synth: Synth) -> None:
    templates = synth.resources("AWS::EC2::LaunchTemplate")
    behaviour = {
        n["Properties"]["InstanceInitiatedShutdownBehavior"] for n in synth.instances_by_rank()
    }
    if case(synth) == "p4d-efa-spot":
        data = next(iter(templates.values()))["Properties"]["LaunchTemplateData"]
        assert data["InstanceMarketOptions"] == {
            "MarketType": "spot",
            "SpotOptions": {
                "InstanceInterruptionBehavior": "terminate",
                "SpotInstanceType": "one-time",
            },
        }
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        assert behaviour == {"terminate"}  # a one-time spot instance cannot be stopped
    else:
        assert behaviour == {"stop"}


def test_gpu_nodes_get_a_volume_that_fits_the_deep_learning_ami(synth: Synth) -> None:
    for node in synth.instances_by_rank():
        (device,) = node["Properties"]["BlockDeviceMappings"]
        assert device["Ebs"]["VolumeSize"] == GPU_DEFAULT_VOLUME_GB


def test_gpu_templates_are_checkov_clean(synth: Synth) -> None:
    results = checkov(synth.template_path)["results"]
    assert [(c["check_id"], c["resource"]) for c in results["failed_checks"]] == []
    for check in results.get("skipped_checks", []):
        assert len(check["check_result"].get("suppress_comment") or "") > 20, check


def test_gpu_templates_are_nag_and_lint_clean(synth: Synth) -> None:
    assert synth.violations("AwsSolutions") == []
    assert [v["ruleName"] for v in synth.violations("CloudFormation Validate")] == []
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), str(synth.template_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + json.dumps(CASES[case(synth)])
