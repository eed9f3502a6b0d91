"""The cluster's network: one public subnet, and the nodes' security group."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from constructs import Construct

from stacks.nag import ack

VPC_CIDR = "10.42.0.0/16"


class Network(Construct):
    """The VPC (one public subnet in one AZ: nodes are close together and no NAT gateway bills)
    and the security group every node is in: SSH from ssh_cidr (None: from inside the VPC), and
    all TCP between the nodes (all traffic with EFA)."""

    def __init__(
        self, scope: Construct, construct_id: str, *, ssh_cidr: str | None, efa: bool
    ) -> None:
        super().__init__(scope, construct_id)
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(VPC_CIDR),
            max_azs=1,
            nat_gateways=0,
            restrict_default_security_group=False,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="nodes", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24
                )
            ],
        )
        ack(
            self.vpc,
            "AwsSolutions-VPC7",
            "The VPC holds only the short-lived training nodes; flow logs would add cost "
            "without a consumer. Node logs go to the journal and the boot log.",
        )
        self.security_group = self._security_group(ssh_cidr, efa)

    def _security_group(self, ssh_cidr: str | None, efa: bool) -> ec2.SecurityGroup:
        group = ec2.SecurityGroup(
            self,
            "SecurityGroup",
            vpc=self.vpc,
            description="Fabric cluster nodes: SSH from ssh_cidr, all TCP between nodes",
            allow_all_outbound=True,  # uv, PyPI and the PyTorch index at boot
        )
        ssh_peer = ec2.Peer.ipv4(ssh_cidr) if ssh_cidr else ec2.Peer.ipv4(VPC_CIDR)
        group.add_ingress_rule(ssh_peer, ec2.Port.tcp(22), "SSH")
        # gloo and NCCL open ephemeral ports beyond main_port between every pair of nodes.
        if efa:
            # EFA's transport is not TCP: it needs all traffic within the group, both ways. The
            # 0.0.0.0/0 egress rule does not cover EFA, and with allow_all_outbound CDK drops
            # add_egress_rule: the outbound rule is its own resource.
            group.add_ingress_rule(group, ec2.Port.all_traffic(), "All traffic between nodes (EFA)")
            ec2.CfnSecurityGroupEgress(
                self,
                "EfaEgress",
                group_id=group.security_group_id,
                ip_protocol="-1",
                destination_security_group_id=group.security_group_id,
                description="All traffic to the other nodes (EFA)",
            )
        else:
            group.add_ingress_rule(group, ec2.Port.all_tcp(), "All TCP between cluster nodes")
        if ssh_cidr == "0.0.0.0/0":
            cdk.Annotations.of(group).add_warning_v2(
                "fabric:ssh-open-to-world",
                "ssh_cidr=0.0.0.0/0 opens SSH to the whole internet; prefer your own /32 or "
                "Session Manager (no SSH needed).",
            )
            ack(group, "AwsSolutions-EC23", "The user chose ssh_cidr=0.0.0.0/0 explicitly.")
        return group
