"""The training cluster, disposable: network, role, payload, phases and N identical nodes; its
runs and logs live in the storage stack (stacks/storage_stack.py), which outlives it.

What each part is lives in a module of its own (network.py, shared_fs.py, node_role.py,
nodes.py, cluster_parameters.py, cluster_outputs.py); this stack makes them and grants between
them."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct

from stacks.cluster_outputs import add_outputs
from stacks.cluster_parameters import membership_parameters, node_written_parameters
from stacks.config import ClusterConfig
from stacks.network import VPC_CIDR, Network
from stacks.node_role import NodeRole
from stacks.nodes import Nodes, ami_parameter
from stacks.payload import payload_asset
from stacks.run_name import run_fingerprint, run_name
from stacks.shared_fs import SharedFileSystem
from stacks.storage_stack import bucket_export, log_group_export
from stacks.user_data import render_boot_script

__all__ = ["VPC_CIDR", "ClusterStack"]  # VPC_CIDR: the rehearsal finds the VPC by it


class ClusterStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        env: cdk.Environment | None = None,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            env=env,
            stack_name=config.stack_name,
            description=(
                f"Lightning Fabric training cluster: {config.num_nodes} x {config.instance_type}, "
                f"{config.devices_per_node} {config.accelerator} device(s) per node"
            ),
        )
        self.config = config
        network = Network(self, "Network", ssh_cidr=config.ssh_cidr, efa=config.efa)
        self.vpc, self.security_group = network.vpc, network.security_group
        self.shared = (
            SharedFileSystem(
                self, "SharedRunDir", vpc=self.vpc, nodes_security_group=self.security_group
            )
            if config.shared_fs == "efs"
            else None
        )
        # The storage stack's bucket (or the user's own) and log group: they outlive this stack.
        self.bucket = s3.Bucket.from_bucket_name(
            self,
            "Artifacts",
            config.artifacts_bucket or cdk.Fn.import_value(bucket_export(config.storage_stack)),
        )
        self.logs = logs.LogGroup.from_log_group_name(
            self, "Logs", cdk.Fn.import_value(log_group_export(config.storage_stack))
        )
        self.payload = payload_asset(self, "Payload", config)
        self.run_name = run_name(config)
        self.phase_parameters, self.stop = node_written_parameters(self, config)
        self.role = NodeRole(self, "NodeRole", config=config)
        self._grant_nodes()
        nodes = Nodes(
            self,
            "Nodes",
            config=config,
            vpc=self.vpc,
            security_group=self.security_group,
            role=self.role,
            user_data=self._boot_script(),
        )
        self.nodes, self.groups = nodes.instances, nodes.groups  # by rank, one of them empty
        if self.shared:  # the mount target exists before a node boots and mounts it
            for node in [*self.nodes, *self.groups]:
                node.node.add_dependency(self.shared.mount_targets)
        self.main_address, self.members = membership_parameters(self, config, self.nodes)
        if config.recover:  # node 0 publishes them, at each generation
            self.main_address.grant_write(self.role)
            self.members.grant_write(self.role)
        add_outputs(self, config, self.nodes, self.run_name, self.groups)

    def _grant_nodes(self) -> None:
        """What a node may do beyond its role's own statements (Session Manager, the reads of
        the cluster-wide parameters): read the payload; read and put, no delete, in the bucket;
        write its phase and the stop (one failed or stopped node stops them all); its logs."""
        self.payload.grant_read(self.role)
        self.bucket.grant_read(self.role)
        self.bucket.grant_put(self.role)
        for parameter in self.phase_parameters:
            parameter.grant_write(self.role)  # its own; nodes read only the cluster's stop
        self.stop.grant_write(self.role)
        self.logs.grant_write(self.role)

    def _boot_script(self) -> ec2.UserData:
        """Every node's user data: where its payload, bucket, run and logs are."""
        return ec2.UserData.custom(
            render_boot_script(
                self.config,
                region=self.region,
                payload_url=self.payload.s3_object_url,
                artifacts_bucket=self.bucket.bucket_name,
                run_name=self.run_name,
                run_fingerprint=run_fingerprint(self.config),
                log_group=self.logs.log_group_name,
                shared_fs=self.shared.dns_name if self.shared else "",
            )
        )

    @property
    def ami_parameter(self) -> str:
        return ami_parameter(self.config)
