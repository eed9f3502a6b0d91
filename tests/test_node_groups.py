"""recover: node 0 publishes the generation from the ranks' Auto Scaling groups, and a node whose
run is over scales its own group to zero (userdata/node_groups.py), against moto's Auto Scaling,
which launches an instance for a group and replaces one that is terminated."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from userdata.errors import AgentError
from userdata.generations import NOT_PUBLISHED, Generation
from userdata.imds import TAG_CLUSTER, TAG_NODE_RANK
from userdata.node_groups import cluster_groups, holders, publish_generation, scale_to_zero

REGION = "us-east-1"
MAIN, MEMBERS = "/fabric/C/main-address", "/fabric/C/members"


@pytest.fixture
def aws() -> Iterator[dict[str, Any]]:
    with mock_aws():
        clients = {name: boto3.client(name, region_name=REGION) for name in ("ec2", "ssm")}
        clients["autoscaling"] = boto3.client("autoscaling", region_name=REGION)
        for name in (MAIN, MEMBERS):
            clients["ssm"].put_parameter(Name=name, Value=NOT_PUBLISHED, Type="String")
        yield clients


def make_groups(aws: dict[str, Any], cluster: str, sizes: list[int]) -> list[str]:
    """A group per rank (sizes[rank] instances wanted), tagged as the stack tags them."""
    ec2 = aws["ec2"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    template = ec2.create_launch_template(
        LaunchTemplateName=f"{cluster}-nodes",
        LaunchTemplateData={"ImageId": image, "InstanceType": "t2.large"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    names = []
    for rank, size in enumerate(sizes):
        name = f"{cluster}-rank-{rank}"
        aws["autoscaling"].create_auto_scaling_group(
            AutoScalingGroupName=name,
            LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"},
            MinSize=size,
            MaxSize=1,
            DesiredCapacity=size,
            VPCZoneIdentifier=subnet,
            Tags=[
                {"Key": TAG_NODE_RANK, "Value": str(rank), "PropagateAtLaunch": True},
                {"Key": TAG_CLUSTER, "Value": cluster, "PropagateAtLaunch": False},
            ],
        )
        names.append(name)
    return names


def instance_of(aws: dict[str, Any], name: str) -> str:
    (group,) = aws["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
        "AutoScalingGroups"
    ]
    (instance,) = group["Instances"]
    return str(instance["InstanceId"])


def publish(aws: dict[str, Any], instance: str, num_nodes: int = 2, **options: Any) -> Generation:
    said: list[str] = []
    options = {"timeout": 30.0, "log": said.append, **options}
    return publish_generation(
        aws["ssm"],
        aws["autoscaling"],
        cluster="C",
        num_nodes=num_nodes,
        instance=instance,
        private_ip="10.0.1.9",
        main_address_parameter=MAIN,
        members_parameter=MEMBERS,
        **options,
    )


def value(aws: dict[str, Any], name: str) -> str:
    return str(aws["ssm"].get_parameter(Name=name)["Parameter"]["Value"])


def test_node_0_publishes_its_address_then_the_generation_of_the_groups_instances(
    aws: dict[str, Any],
) -> None:
    names = make_groups(aws, "C", [1, 1])
    make_groups(aws, "Other", [1, 1])  # another cluster's groups, side by side
    node0, node1 = (instance_of(aws, name) for name in names)
    first = publish(aws, node0)
    assert first == Generation(1, (node0, node1))
    assert value(aws, MAIN) == "10.0.1.9" and value(aws, MEMBERS) == f"1:{node0},{node1}"
    assert publish(aws, node0) == first  # node 0 started again (a reboot): nothing new
    aws["ec2"].terminate_instances(InstanceIds=[node1])  # its group replaces it at once
    replacement = instance_of(aws, names[1])
    assert replacement != node1
    assert publish(aws, node0) == Generation(2, (node0, replacement))


def test_node_0_waits_for_every_rank_within_the_capacity_wait(aws: dict[str, Any]) -> None:
    names = make_groups(aws, "C", [1, 0])  # rank 1 has no capacity
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(AgentError) as error:
        publish(aws, instance_of(aws, names[0]), timeout=60.0, clock=lambda: now[0], sleep=sleep)
    assert str(error.value) == (
        "no instance for rank(s) [1] after 1 min (capacity_wait_minutes): EC2 had no capacity "
        "for them"
    )
    assert value(aws, MEMBERS) == NOT_PUBLISHED  # nothing half-published


def test_a_node_0_whose_rank_another_instance_holds_publishes_nothing(aws: dict[str, Any]) -> None:
    make_groups(aws, "C", [1, 1])
    with pytest.raises(AgentError, match="this node was replaced"):
        publish(aws, "i-00000000000000000")
    assert value(aws, MAIN) == NOT_PUBLISHED


def test_a_node_scales_only_its_own_group_to_zero_and_its_instance_terminates(
    aws: dict[str, Any],
) -> None:
    names = make_groups(aws, "C", [1, 1])
    node1 = instance_of(aws, names[1])
    assert scale_to_zero(aws["autoscaling"], "C", print, [1])
    groups = cluster_groups(aws["autoscaling"], "C")
    assert holders(groups, 2)[1] is None and holders(groups, 2)[0] is not None
    assert groups[1]["DesiredCapacity"] == 0 and groups[0]["DesiredCapacity"] == 1
    state = aws["ec2"].describe_instances(InstanceIds=[node1])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "terminated"  # not replaced


def test_a_rank_without_a_group_is_said(aws: dict[str, Any]) -> None:
    make_groups(aws, "C", [1])
    said: list[str] = []
    assert not scale_to_zero(aws["autoscaling"], "C", said.append, [3])
    assert said == ["cluster C has no group for some of the ranks [3]"]


def test_the_console_finds_each_ranks_instance_through_its_group(aws: dict[str, Any]) -> None:
    """make status of a recover cluster: the stack's outputs name the groups, not instances."""
    from console.aws import Aws, group_instances

    names = make_groups(aws, "C", [1, 1])
    node0 = instance_of(aws, names[0])
    scale_to_zero(aws["autoscaling"], "C", print, [1])  # rank 1's run is over
    outputs = {"Node0Group": names[0], "Node1Group": names[1], "RunName": "r"}
    found = group_instances(Aws(boto3.Session(region_name=REGION)), outputs)
    assert found == {"Node0InstanceId": node0, "Node1InstanceId": ""}
    assert group_instances(Aws(boto3.Session(region_name=REGION)), {"RunName": "r"}) == {}


def test_make_stop_and_make_resume_scale_every_rank_and_a_cluster_of_instances_is_told(
    aws: dict[str, Any],
) -> None:
    from console.aws import Aws, ConsoleError, Stack
    from console.scaling import run_scale

    names = make_groups(aws, "C", [1, 1])
    before = [instance_of(aws, name) for name in names]
    outputs = {"Node0Group": names[0], "Node1Group": names[1], "RunName": "run-1"}
    stack = Stack(name="C", region=REGION, status="CREATE_COMPLETE", outputs=outputs)
    console = Aws(boto3.Session(region_name=REGION))
    said: list[str] = []
    assert run_scale(console, stack, 0, said.append) == 0
    assert holders(cluster_groups(aws["autoscaling"], "C"), 2) == [None, None]
    assert said[-1].startswith("2 node(s) terminating: node 0 uploads the newest checkpoint")
    assert run_scale(console, stack, 1, said.append) == 0
    after = holders(cluster_groups(aws["autoscaling"], "C"), 2)
    assert None not in after and not set(after) & set(before)  # new instances, one per rank
    assert said[-1] == (
        "2 node(s) launching: run run-1 goes on from its newest checkpoint (make status --watch)"
    )
    instances = Stack(
        name="I", region=REGION, status="CREATE_COMPLETE", outputs={"Node0InstanceId": "i-1"}
    )
    with pytest.raises(
        ConsoleError,
        match=r"^stack I has no group per rank .*make stop and make resume need recover=true",
    ):
        run_scale(console, instances, 0, said.append)


def test_during_a_redeploy_a_node_leaves_its_own_group_and_the_new_group_holds_the_rank(
    aws: dict[str, Any],
) -> None:
    """CloudFormation keeps a rank's old group until the new one exists: both carry the same
    tags. An old node that ends then scales its own group, never the new one."""
    from userdata.node_groups import leave

    old = make_groups(aws, "C", [1])
    old_node = instance_of(aws, old[0])
    aws["autoscaling"].create_auto_scaling_group(
        AutoScalingGroupName="C-rank-0-new",
        LaunchTemplate={"LaunchTemplateName": "C-nodes", "Version": "$Latest"},
        MinSize=1,
        MaxSize=1,
        DesiredCapacity=1,
        VPCZoneIdentifier=aws["ec2"].describe_subnets()["Subnets"][0]["SubnetId"],
        Tags=[
            {"Key": TAG_NODE_RANK, "Value": "0", "PropagateAtLaunch": True},
            {"Key": TAG_CLUSTER, "Value": "C", "PropagateAtLaunch": False},
        ],
    )
    new_node = instance_of(aws, "C-rank-0-new")
    assert holders(cluster_groups(aws["autoscaling"], "C"), 1) == [new_node]  # the newest
    said: list[str] = []
    assert leave(aws["autoscaling"], old_node, said.append)
    assert instance_of(aws, "C-rank-0-new") == new_node
    (group,) = aws["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=old)[
        "AutoScalingGroups"
    ]
    assert group["DesiredCapacity"] == 0 and said[-1].startswith(f"this node's group {old[0]}")


def test_node_0s_watch_publishes_a_pending_then_a_complete_generation(aws: dict[str, Any]) -> None:
    """A rank's instance gone and no replacement yet: a pending generation (every node stops
    at once); the replacement there: the complete one (every node starts again)."""
    from userdata.generations import MISSING
    from userdata.node_groups import GroupWatch

    names = make_groups(aws, "C", [1, 1])
    node0, node1 = (instance_of(aws, name) for name in names)
    said: list[str] = []
    watch = GroupWatch(
        aws["ssm"], aws["autoscaling"], cluster="C", num_nodes=2, instance=node0,
        members_parameter=MEMBERS, generation=publish(aws, node0), interval=15.0,
        log=said.append,
    )  # fmt: skip
    assert watch.look() is None  # nothing changed
    autoscaling = aws["autoscaling"]
    autoscaling.update_auto_scaling_group(
        AutoScalingGroupName=names[1], MinSize=0, DesiredCapacity=0
    )
    pending = watch.look()
    assert pending == Generation(2, (node0, MISSING)) and value(aws, MEMBERS) == f"2:{node0},-"
    autoscaling.update_auto_scaling_group(
        AutoScalingGroupName=names[1], MinSize=1, DesiredCapacity=1
    )
    replacement = instance_of(aws, names[1])
    assert watch.look() == Generation(3, (node0, replacement)) and replacement != node1
    assert said[-1] == f"generation 3 published (complete): 3:{node0},{replacement}"


@pytest.mark.parametrize(
    ("published", "shown"),
    [
        ([NOT_PUBLISHED], r"generation not published yet \(node 0 is booting\)"),
        (["1:i-0a,i-1a"], r"generation 1"),
        (["1:i-0a,i-1a", "2:i-0a,-"], r"generation 2, pending: a replacement is launching"),
        (
            ["1:i-0a,i-1a", "2:i-0a,-", "3:i-0a,i-1b"],
            r"generation 3 \(1 replacement\(s\); last: rank\(s\) \[1\] replaced, training "
            r"again \d+s later\)",
        ),
    ],
)
def test_make_status_shows_the_generation_and_the_last_replacement(
    aws: dict[str, Any], published: list[str], shown: str
) -> None:
    from console.aws import Aws, Stack
    from console.status import describe_generation
    from userdata.phase import encode_phase

    for members in published:
        aws["ssm"].put_parameter(
            Name="/fabric/G/members", Value=members, Type="String", Overwrite=True
        )
    aws["ssm"].put_parameter(
        Name="/fabric/G/node-0/phase",
        Value=encode_phase("training (generation 3)", "i-0a"),
        Type="String",
        Overwrite=True,
    )
    console = Aws(boto3.Session(region_name=REGION))
    groups = Stack(name="G", region=REGION, status="CREATE_COMPLETE", outputs={"Node0Group": "g"})
    assert re.fullmatch(shown, describe_generation(console, groups))
    instances = Stack(name="G", region=REGION, status="CREATE_COMPLETE", outputs={})
    assert describe_generation(console, instances) == ""
