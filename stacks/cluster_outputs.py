"""The cluster stack's outputs: the nodes, the run, where its results are, what still bills.

The console (console/) and the rehearsal (rehearsal/) read them by key, so they are made in the
stack's own scope: an output's key is its construct id there."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2

from stacks.config import ClusterConfig
from stacks.run_name import run_fingerprint


def still_billed(config: ClusterConfig) -> str:
    """What a finished cluster still costs, and how to remove it."""
    when = "stop_when_done" if config.stop_when_done else "stop_when_done off: nodes run on"
    if config.recover:
        nodes = "each node scales its group to zero and terminates: nothing is left of them"
    elif config.spot:
        nodes = "spot nodes terminate when they power off: nothing is left of them"
    else:
        nodes = (
            f"stopped nodes bill only their volumes ({config.num_nodes} x "
            f"{config.volume_gb} GB gp3)"
        )
    return (
        f"After a run ({when}; every node powers off after max_hours={config.max_hours} "
        f"anyway): {nodes}; the storage stack ({config.storage_stack}: the runs' bucket, the "
        "logs) bills its storage. make destroy removes this cluster; make destroy-storage "
        "the runs and logs."
    )


def add_outputs(
    stack: cdk.Stack,
    config: ClusterConfig,
    nodes: list[ec2.Instance],
    run_name: str,
    groups: list[autoscaling.AutoScalingGroup] | None = None,
) -> None:
    for rank, group in enumerate(groups or []):  # recover: the instance changes, the group not
        cdk.CfnOutput(stack, f"Node{rank}Group", value=group.auto_scaling_group_name)
    for rank, node in enumerate(nodes):
        cdk.CfnOutput(stack, f"Node{rank}InstanceId", value=node.instance_id)
        cdk.CfnOutput(stack, f"Node{rank}PrivateIp", value=node.instance_private_ip)
        cdk.CfnOutput(
            stack,
            f"Node{rank}Session",
            description=f"Shell on node {rank} through Session Manager",
            value=cdk.Fn.join(
                "",
                [
                    "aws ssm start-session --region ",
                    stack.region,
                    " --target ",
                    node.instance_id,
                ],
            ),
        )
    # Where the runs and logs are: the storage stack's outputs (an output may not re-export
    # an import); a bucket of the user's own, by its name.
    cdk.CfnOutput(stack, "StorageStack", value=config.storage_stack)
    if config.artifacts_bucket:
        cdk.CfnOutput(stack, "ArtifactsBucket", value=config.artifacts_bucket)
    cdk.CfnOutput(
        stack,
        "RunName",
        description="The run this deploy trains: s3://<ArtifactsBucket>/<stack>/<run>/",
        value=run_name,
    )
    cdk.CfnOutput(
        stack,
        "RunFingerprint",
        description="What the nodes train; a complete run with another one trains on",
        value=run_fingerprint(config),
    )
    cdk.CfnOutput(stack, "StillBilled", value=still_billed(config))
    cdk.CfnOutput(stack, "MainAddressParameter", value=config.main_address_parameter)
