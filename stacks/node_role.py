"""The nodes' instance role: Session Manager, the cluster-wide parameters it reads, and the
cdk-nag and checkov acknowledgments of what the stack grants it."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from constructs import Construct

from stacks.config import TAG_CLUSTER, ClusterConfig
from stacks.nag import ack, checkov_skip
from stacks.storage_stack import bucket_export, log_group_export

SESSION_MANAGER_REASON = (
    "Session Manager's channel and instance-information actions take no resource; every other "
    "write names its own parameters and bucket."
)
# What Session Manager needs on the instance (AWS's minimal instance policy), instead of
# AmazonSSMManagedInstanceCore, whose ssm:GetParameter(s) on * reads every parameter.
SESSION_MANAGER_ACTIONS = (
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel",
    "ssmmessages:CreateDataChannel",
    "ssmmessages:OpenControlChannel",
    "ssmmessages:OpenDataChannel",
    "ec2messages:AcknowledgeMessage",
    "ec2messages:DeleteMessage",
    "ec2messages:FailMessage",
    "ec2messages:GetEndpoint",
    "ec2messages:GetMessages",
    "ec2messages:SendReply",
)


class NodeRole(iam.Role):
    """The role of every node. The stack grants it the payload, the bucket (read and put, no
    delete), the phases, the stop and the log group; the findings those grants raise are
    acknowledged here, each with its reason."""

    def __init__(self, scope: Construct, construct_id: str, *, config: ClusterConfig) -> None:
        super().__init__(
            scope,
            construct_id,
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="Fabric cluster node: Session Manager, its parameters, payload, artifacts",
        )
        self.add_to_policy(
            iam.PolicyStatement(actions=list(SESSION_MANAGER_ACTIONS), resources=["*"])
        )
        # By ARN, not through the parameters: they refer to the nodes, which depend on this role.
        stack = cdk.Stack.of(self)
        self.add_to_policy(
            iam.PolicyStatement(
                actions=["ssm:GetParameter", "ssm:GetParameters"],
                resources=[
                    stack.format_arn(
                        service="ssm", resource="parameter", resource_name=name.lstrip("/")
                    )
                    for name in (
                        config.main_address_parameter,
                        config.members_parameter,
                        config.stop_parameter,
                    )
                ],
            )
        )
        if config.recover:
            self._scale_own_groups(stack, config)
            ack(
                self,
                "AwsSolutions-IAM5[Resource::"
                f"{_autoscaling_arn_as_nag_reads_it(stack)}:autoScalingGroup:*:"
                "autoScalingGroupName/*]",
                "The groups' names are CloudFormation's; the condition allows only the groups "
                "tagged with this stack's name.",
            )
        checkov_skip(self.node.find_child("DefaultPolicy"), ("CKV_AWS_111", SESSION_MANAGER_REASON))
        for finding, reason in (
            ("Resource::*", SESSION_MANAGER_REASON),
            ("Action::s3:GetBucket*", "CDK grant_read of the payload asset and the bucket."),
            ("Action::s3:GetObject*", "CDK grant_read of the payload asset and the bucket."),
            ("Action::s3:List*", "CDK grant_read of the payload asset and the bucket."),
            ("Action::s3:Abort*", "Aborts its own failed multipart checkpoint uploads."),
            (
                f"Resource::{_bucket_arn_as_nag_reads_it(stack, config)}/*",
                "Nodes write checkpoints and metrics under any key of the cluster's own bucket.",
            ),
            (
                f"Resource::{_asset_bucket_arn_as_nag_reads_it(stack)}/*",
                "Read of the CDK asset bucket, where the payload zip lives.",
            ),
            (
                f"Resource::{_log_group_arn_as_nag_reads_it(stack, config)}",
                "Writes its own streams in the storage stack's log group (a stream per node).",
            ),
        ):
            ack(self, f"AwsSolutions-IAM5[{finding}]", reason)

    def _scale_own_groups(self, stack: cdk.Stack, config: ClusterConfig) -> None:
        """recover: node 0 reads which instance each rank's group holds, and a node whose run
        has ended scales its group to zero (a node that only powered off would be replaced).
        Describe takes no resource (AWS); the change only on groups tagged with this stack."""
        self.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                ],
                resources=["*"],
            )
        )
        self.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "autoscaling:UpdateAutoScalingGroup",
                    "autoscaling:TerminateInstanceInAutoScalingGroup",
                ],
                resources=[
                    stack.format_arn(
                        service="autoscaling",
                        resource="autoScalingGroup",
                        resource_name="*:autoScalingGroupName/*",
                        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
                    )
                ],
                conditions={
                    "StringEquals": {f"autoscaling:ResourceTag/{TAG_CLUSTER}": config.stack_name}
                },
            )
        )


def _partition_as_nag_reads_it(stack: cdk.Stack) -> tuple[str, str]:
    """The partition and region:account of an ARN as cdk-nag prints it: literal with
    credentials at synth (an environment), intrinsics without."""
    if cdk.Token.is_unresolved(stack.account) or cdk.Token.is_unresolved(stack.region):
        return "<AWS::Partition>", "<AWS::Region>:<AWS::AccountId>"
    return stack.partition, f"{stack.region}:{stack.account}"


def _autoscaling_arn_as_nag_reads_it(stack: cdk.Stack) -> str:
    partition, where = _partition_as_nag_reads_it(stack)
    return f"arn:{partition}:autoscaling:{where}"


def _bucket_arn_as_nag_reads_it(stack: cdk.Stack, config: ClusterConfig) -> str:
    # The storage stack's bucket appears by its export's name (an Fn::ImportValue).
    name = config.artifacts_bucket or bucket_export(config.storage_stack)
    return f"arn:{_partition_as_nag_reads_it(stack)[0]}:s3:::{name}"


def _log_group_arn_as_nag_reads_it(stack: cdk.Stack, config: ClusterConfig) -> str:
    partition, where = _partition_as_nag_reads_it(stack)
    return f"arn:{partition}:logs:{where}:log-group:{log_group_export(config.storage_stack)}:*"


def _asset_bucket_arn_as_nag_reads_it(stack: cdk.Stack) -> str:
    """Literal with credentials at synth (an environment), intrinsics without."""
    if cdk.Token.is_unresolved(stack.account) or cdk.Token.is_unresolved(stack.region):
        return "arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-<AWS::AccountId>-<AWS::Region>"
    return f"arn:{stack.partition}:s3:::cdk-hnb659fds-assets-{stack.account}-{stack.region}"
