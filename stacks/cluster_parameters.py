"""The cluster's SSM parameters: each node's phase and the cluster's stop (the nodes write them),
node 0's address and the members (the deploy writes them, from the nodes).

Their names are fixed (stacks/config.py), so they are made in the scope they are given, the
stack, with the logical ids of earlier deploys: under a new logical id CloudFormation would
create a parameter whose name exists before it deletes the old one, and the deploy would fail."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.config import ClusterConfig
from userdata.cluster_control import NO_STOP
from userdata.generations import NOT_PUBLISHED

INITIAL_PHASE = "booting"


def node_written_parameters(
    scope: Construct, config: ClusterConfig
) -> tuple[list[ssm.StringParameter], ssm.StringParameter]:
    """Each node's phase (by rank), and the stop: why the cluster stopped, if it did."""
    phases = [
        ssm.StringParameter(
            scope,
            f"Node{rank}Phase",
            parameter_name=config.phase_parameter(rank),
            string_value=INITIAL_PHASE,
            description=f"Phase of node {rank}, written by its node agent",
        )
        for rank in range(config.num_nodes)
    ]
    stop = ssm.StringParameter(
        scope,
        "Stop",
        parameter_name=config.stop_parameter,
        string_value=NO_STOP,
        description="Why the cluster stopped (failed or interrupted), by the first node",
    )
    return phases, stop


def membership_parameters(
    scope: Construct, config: ClusterConfig, nodes: list[ec2.Instance]
) -> tuple[ssm.StringParameter, ssm.StringParameter]:
    """Node 0's private address, and the instance ids by rank: from the instances, or (recover:
    a group per rank, whose instance may be replaced) published by node 0 at each generation."""
    main_address = ssm.StringParameter(
        scope,
        "MainAddress",
        parameter_name=config.main_address_parameter,
        string_value=NOT_PUBLISHED if config.recover else nodes[0].instance_private_ip,
        description="Private IP of node 0, the main node of fabric run",
    )
    members = ssm.StringParameter(
        scope,
        "Members",
        parameter_name=config.members_parameter,
        string_value=NOT_PUBLISHED
        if config.recover
        else cdk.Fn.join(",", [node.instance_id for node in nodes]),
        description="The cluster's instance ids by rank: phases and stops of others are old",
    )
    # After the main address: a node that finds itself among the members (a redeploy's new
    # node) reads the new node 0's address, never the old one's.
    members.node.add_dependency(main_address)
    return main_address, members
