"""recover=true: each rank an Auto Scaling group of one instance, all from one launch template
(the user data once, the rank a tag propagated at launch), replaced by its group when it is lost;
node 0 publishes the main address and the members; the node role may scale only its own stack's
groups. recover=false keeps one AWS::EC2::Instance per rank (the other template tests)."""

from __future__ import annotations

from typing import Any

import pytest

from stacks.config import TAG_CLUSTER, TAG_NODE_RANK, TAG_NUM_NODES
from tests.cfn import Synth, assert_lint_clean, synthesized, user_data_text
from userdata.generations import NOT_PUBLISHED

SPOT_TYPES = "t3.large,m5.large"


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory, recover=True, num_nodes=3)


@pytest.fixture(scope="module")
def spot_groups(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory, spot=True, recover="auto", instance_types=SPOT_TYPES)


def by_rank(synth: Synth) -> list[dict[str, Any]]:
    def rank(group: dict[str, Any]) -> int:
        tags = {tag["Key"]: tag for tag in group["Properties"]["Tags"]}
        return int(tags[TAG_NODE_RANK]["Value"])

    return sorted(synth.resources("AWS::AutoScaling::AutoScalingGroup").values(), key=rank)


def test_one_group_of_exactly_one_instance_per_rank_from_the_one_launch_template(
    groups: Synth,
) -> None:
    assert groups.resources("AWS::EC2::Instance") == {}
    found = by_rank(groups)
    assert len(found) == 3
    (template_id,) = groups.resources("AWS::EC2::LaunchTemplate")
    for rank, group in enumerate(found):
        props = group["Properties"]
        assert (props["MinSize"], props["MaxSize"], props["DesiredCapacity"]) == ("1", "1", "1")
        assert props["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": template_id}
        assert len(props["VPCZoneIdentifier"]) == 1  # the cluster's subnet
        assert props["HealthCheckType"] == "EC2"
        tags = {tag["Key"]: (tag["Value"], tag["PropagateAtLaunch"]) for tag in props["Tags"]}
        assert tags[TAG_NODE_RANK] == (str(rank), True)  # the rank, on every instance it launches
        assert tags[TAG_NUM_NODES] == ("3", True)
        assert tags[TAG_CLUSTER] == ("FabricCluster", False)
        # A redeploy makes new groups beside the old, as new instances beside the old ones.
        assert group["UpdatePolicy"]["AutoScalingReplacingUpdate"] == {"WillReplace": True}
        assert group["DependsOn"]  # the file system's mount target first


def test_the_launch_template_holds_what_an_instance_said_itself(groups: Synth) -> None:
    data = groups.launch_template()["Properties"]["LaunchTemplateData"]
    assert data["InstanceType"] == "t2.large" and "ImageId" in data
    assert data["IamInstanceProfile"] == {"Arn": {"Fn::GetAtt": [next(iter(
        groups.resources("AWS::IAM::InstanceProfile"))), "Arn"]}}  # fmt: skip
    assert data["MetadataOptions"] == {"HttpTokens": "required", "InstanceMetadataTags": "enabled"}
    (volume,) = data["BlockDeviceMappings"]
    assert volume["Ebs"]["Encrypted"] is True and volume["Ebs"]["VolumeType"] == "gp3"
    assert len(data["SecurityGroupIds"]) == 1
    assert "InstanceMarketOptions" not in data  # spot comes from the groups' policy
    text = user_data_text(groups.launch_template())
    assert "readonly RECOVER=true" in text and "readonly CAPACITY_WAIT_MINUTES=30" in text


def test_node_0_publishes_the_main_address_and_the_members(groups: Synth) -> None:
    values = {
        resource["Properties"]["Name"]: resource["Properties"]["Value"]
        for resource in groups.resources("AWS::SSM::Parameter").values()
    }
    config = groups.stack.config
    assert values[config.main_address_parameter] == NOT_PUBLISHED
    assert values[config.members_parameter] == NOT_PUBLISHED
    outputs = groups.template_dict["Outputs"]
    assert [key for key in outputs if key.startswith("Node")] == [
        "Node0Group",
        "Node1Group",
        "Node2Group",
    ]


def statements(synth: Synth) -> list[dict[str, Any]]:
    return [
        statement
        for policy in synth.resources("AWS::IAM::Policy").values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def actions(statement: dict[str, Any]) -> set[str]:
    found = statement["Action"]
    return {found} if isinstance(found, str) else set(found)


def as_list(found: Any) -> list[Any]:
    return found if isinstance(found, list) else [found]


def test_the_role_may_scale_only_its_own_stacks_groups(groups: Synth) -> None:
    scaling = [
        s for s in statements(groups) if any(a.startswith("autoscaling:") for a in actions(s))
    ]
    describe, update = sorted(scaling, key=lambda s: "Condition" in s)
    # Describe takes no resource (merged with the other actions on *, Session Manager's).
    assert {a for a in actions(describe) if a.startswith("autoscaling:")} == {
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:DescribeAutoScalingInstances",
    }
    assert describe["Resource"] == "*" and "Condition" not in describe
    assert actions(update) == {
        "autoscaling:UpdateAutoScalingGroup",
        "autoscaling:TerminateInstanceInAutoScalingGroup",
    }
    assert update["Condition"] == {
        "StringEquals": {f"autoscaling:ResourceTag/{TAG_CLUSTER}": "FabricCluster"}
    }
    config = groups.stack.config
    parameters = groups.resources("AWS::SSM::Parameter")
    written = {
        parameters[part["Ref"]]["Properties"]["Name"]
        for statement in statements(groups)
        if "ssm:PutParameter" in actions(statement)
        for resource in as_list(statement["Resource"])
        for part in resource["Fn::Join"][1]
        if isinstance(part, dict) and part.get("Ref") in parameters
    }
    assert {config.main_address_parameter, config.members_parameter} <= written


def test_spot_groups_pick_among_the_types_price_capacity_optimized(spot_groups: Synth) -> None:
    assert spot_groups.stack.config.recover  # auto: true with spot
    for group in by_rank(spot_groups):
        policy = group["Properties"]["MixedInstancesPolicy"]
        overrides = policy["LaunchTemplate"]["Overrides"]
        assert [o["InstanceType"] for o in overrides] == ["t2.large", "t3.large", "m5.large"]
        assert policy["InstancesDistribution"] == {
            "OnDemandBaseCapacity": 0,
            "OnDemandPercentageAboveBaseCapacity": 0,
            "SpotAllocationStrategy": "price-capacity-optimized",
        }
        assert "LaunchTemplate" not in group["Properties"]


def test_cdk_nag_cfn_lint_and_checkov_are_clean(groups: Synth, spot_groups: Synth) -> None:
    assert_lint_clean(groups, spot_groups)


def test_64_ranks_of_groups_stay_within_cloudformations_limits(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    synth = synthesized(tmp_path_factory, recover=True, num_nodes=64)
    assert len(synth.resources("AWS::AutoScaling::AutoScalingGroup")) == 64
    assert len(synth.template_dict["Resources"]) <= 500
    assert len(synth.template_dict["Outputs"]) <= 200
    assert synth.template_path.stat().st_size < 1_000_000


def test_gpu_spot_groups_with_efa_share_the_placement_group_and_the_efa_interface(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """recover is auto: true with spot. The groups launch into the cluster placement group; the
    EFA interface carries the nodes' security group, and the groups give the subnet."""
    synth = synthesized(
        tmp_path_factory, accelerator="gpu", instance_type="p4d.24xlarge",
        devices_per_node="auto", efa="true", spot="true", num_nodes=2,
        instance_types="p4de.24xlarge",
    )  # fmt: skip
    assert synth.stack.config.recover and synth.resources("AWS::EC2::Instance") == {}
    (placement,) = synth.resources("AWS::EC2::PlacementGroup")
    data = synth.launch_template()["Properties"]["LaunchTemplateData"]
    (interface,) = data["NetworkInterfaces"]
    assert interface["InterfaceType"] == "efa" and "SubnetId" not in interface
    assert len(interface["Groups"]) == 1 and "SecurityGroupIds" not in data
    for group in by_rank(synth):
        props = group["Properties"]
        assert props["PlacementGroup"] == {"Fn::GetAtt": [placement, "GroupName"]}
        overrides = props["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
        assert [o["InstanceType"] for o in overrides] == ["p4d.24xlarge", "p4de.24xlarge"]
    assert synth.violations("AwsSolutions") == []
