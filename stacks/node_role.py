"""The nodes' instance role: Session Manager, the cluster-wide parameters it reads, and the
cdk-nag and checkov acknowledgments of what the stack grants it."""

from __future__ import annotations

import re

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from constructs import Construct

from stacks.config import TAG_CLUSTER, ClusterConfig
from stacks.nag import ack, checkov_skip
from stacks.storage_stack import bucket_export, log_group_export
from userdata.run_inputs import SecretRef

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
        self._read_data(stack, config)
        self._read_secrets(stack, config)
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

    def _read_data(self, stack: cdk.Stack, config: ClusterConfig) -> None:
        """Each data channel read-only and nothing beside it: the bucket's listing under the
        prefix (s3:prefix), the objects under it. A KMS-encrypted bucket's key is the user's
        to grant (README)."""
        for channel in config.inputs.data:
            bucket = f"arn:{stack.partition}:s3:::{channel.bucket}"
            listing = iam.PolicyStatement(actions=["s3:ListBucket"], resources=[bucket])
            if channel.prefix:
                listing.add_condition("StringLike", {"s3:prefix": f"{channel.prefix}*"})
            self.add_to_policy(listing)
            self.add_to_policy(
                iam.PolicyStatement(
                    actions=["s3:GetObject"], resources=[f"{bucket}/{channel.prefix}*"]
                )
            )
            ack(
                self,
                "AwsSolutions-IAM5[Resource::"
                f"arn:{_partition_as_nag_reads_it(stack)[0]}:s3:::{channel.bucket}/"
                f"{channel.prefix}*]",
                f"Read-only, the objects under data channel {channel.name}'s prefix.",
            )

    def _read_secrets(self, stack: cdk.Stack, config: ClusterConfig) -> None:
        """Exactly the named parameters and secrets, read at boot (GetParameter with
        decryption, GetSecretValue), and kms:Decrypt only through that service for exactly
        those (the encryption context names the parameter or secret). The default keys
        (aws/ssm, aws/secretsmanager) need no more; a customer-managed key's policy must allow
        the role (README)."""
        for service, action, context_key in SECRET_SERVICES:
            secrets = [secret for secret in config.inputs.secrets if secret.service == service]
            if not secrets:
                continue
            arns = [secret_arn(stack, secret) for secret in secrets]
            self.add_to_policy(iam.PolicyStatement(actions=[action], resources=arns))
            places = sorted({_secret_place(stack, secret) for secret in secrets})
            self.add_to_policy(
                iam.PolicyStatement(
                    actions=["kms:Decrypt"],
                    resources=[
                        f"arn:{partition}:kms:{region}:{account}:key/*"
                        for partition, region, account in places
                    ],
                    conditions={
                        "StringEquals": {
                            "kms:ViaService": sorted(
                                {f"{service}.{region}.amazonaws.com" for _, region, _ in places}
                            )
                        },
                        "StringLike": {f"kms:EncryptionContext:{context_key}": arns},
                    },
                )
            )
            for partition, region, account in places:
                if partition == stack.partition:
                    partition, where = _partition_as_nag_reads_it(stack)
                    partition_region = f"{partition}:kms:{where}"
                else:
                    partition_region = f"{partition}:kms:{region}:{account}"
                ack(
                    self,
                    f"AwsSolutions-IAM5[Resource::arn:{partition_region}:key/*]",
                    f"kms:Decrypt only through {service} and only for the named "
                    f"{'parameters' if service == 'ssm' else 'secrets'} (encryption context).",
                )

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


# Where a secret's value is read, and the KMS encryption context key naming it.
SECRET_SERVICES = (
    ("ssm", "ssm:GetParameter", "PARAMETER_ARN"),
    ("secretsmanager", "secretsmanager:GetSecretValue", "SecretARN"),
)


_SECRET_SUFFIX = re.compile(r"-[A-Za-z0-9]{6}$")


def _secret_place(stack: cdk.Stack, secret: SecretRef) -> tuple[str, str, str]:
    """(partition, region, account) of a secret: its ARN's, else the stack's."""
    if secret.arn_parts:
        partition, region, account, _ = secret.arn_parts
        return partition, region, account
    return stack.partition, stack.region, stack.account


def secret_arn(stack: cdk.Stack, secret: SecretRef) -> str:
    """A parameter's ARN, or a secret's with the six characters Secrets Manager appends to its
    name (AWS: name-??????, not name-*, which would also match name-a-longer-name)."""
    if secret.arn_parts:
        if secret.service == "secretsmanager" and not _SECRET_SUFFIX.search(secret.name):
            return f"{secret.name}-??????"  # a partial ARN: Secrets Manager accepts it
        return secret.name
    if secret.service == "ssm":
        return stack.format_arn(
            service="ssm", resource="parameter", resource_name=secret.name.lstrip("/")
        )
    return stack.format_arn(
        service="secretsmanager",
        resource="secret",
        resource_name=f"{secret.name}-??????",
        arn_format=cdk.ArnFormat.COLON_RESOURCE_NAME,
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
