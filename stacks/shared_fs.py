"""The cluster's shared run directory: one Amazon EFS file system that every node mounts at boot,
so that every rank reads what any rank wrote (rank 0's checkpoint that `fabric.load` reads on
every rank, the shards of a sharded checkpoint). It lives and dies with the cluster; the runs'
store that outlives clusters is the storage stack's bucket."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_efs as efs
from constructs import Construct, IDependable

# Where every node mounts it (boot.sh); the run directory is a folder of it.
MOUNT_POINT = "/mnt/fabric-shared"


class SharedFileSystem(Construct):
    """Encrypted at rest (the account's EFS key), elastic throughput (billed by use, no
    provisioned floor), one mount target in the nodes' subnet, and NFS (2049) from the nodes'
    security group only; nothing else reaches it and it has no public endpoint."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        vpc: ec2.IVpc,
        nodes_security_group: ec2.ISecurityGroup,
    ) -> None:
        super().__init__(scope, construct_id)
        group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=vpc,
            description="Fabric cluster shared run directory: NFS from the nodes only",
            allow_all_outbound=False,  # NFS answers on the connection the client opened
        )
        self.file_system = efs.FileSystem(
            self,
            "FileSystem",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
            security_group=group,
            encrypted=True,
            throughput_mode=efs.ThroughputMode.ELASTIC,
            performance_mode=efs.PerformanceMode.GENERAL_PURPOSE,
            # Disposable as the cluster is: S3 holds the runs (node 0 syncs this folder there).
            removal_policy=cdk.RemovalPolicy.DESTROY,
            # Mounted with the distribution's NFS client. IAM authorization would need
            # amazon-efs-utils (TLS), which Ubuntu does not package; the security group is the
            # access control: NFS from the nodes' group only, mount targets in this VPC only.
            # So the node role needs no elasticfilesystem permission at all.
            allow_anonymous_access=True,
        )
        self.file_system.connections.allow_default_port_from(
            nodes_security_group, "NFS from the cluster's nodes"
        )

    @property
    def dns_name(self) -> str:
        """The name a node mounts (it resolves to the mount target in its subnet)."""
        stack = cdk.Stack.of(self)
        return f"{self.file_system.file_system_id}.efs.{stack.region}.{stack.url_suffix}"

    @property
    def mount_targets(self) -> IDependable:
        """What a node must wait for: the mount target exists before the instance boots."""
        return self.file_system.mount_targets_available
