"""The training cluster, disposable: network, role, payload, phases and N identical nodes; its
runs and logs live in the storage stack (stacks/storage_stack.py), which outlives it."""

from __future__ import annotations

import aws_cdk as cdk
import jsii
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.config import TAG_NODE_RANK, TAG_NUM_NODES, ClusterConfig
from stacks.nag import ack, checkov_skip
from stacks.payload import payload_asset
from stacks.run_name import run_fingerprint, run_name
from stacks.storage_stack import bucket_export, log_group_export
from stacks.user_data import render_boot_script
from userdata.cluster_control import NO_STOP

UBUNTU_AMI_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
)
# The Deep Learning Base AMI: Ubuntu 24.04 with the NVIDIA driver, CUDA and the EFA software.
GPU_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
)
AMI_PLACEHOLDER = "ami-00000000000000000"  # until the CLI has looked the AMI up
VPC_CIDR = "10.42.0.0/16"
ROOT_DEVICE = "/dev/sda1"  # Ubuntu AMIs' root device
INITIAL_PHASE = "booting"
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


@jsii.implements(ec2.IMachineImage)
class PinnedImage:
    """An AMI id given by the user (the ami setting), in any region."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id

    def get_image(self, _scope: Construct) -> ec2.MachineImageConfig:
        return ec2.MachineImageConfig(
            image_id=self.image_id,
            os_type=ec2.OperatingSystemType.LINUX,
            user_data=ec2.UserData.for_linux(),
        )


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
        self.vpc = self._network()
        self.security_group = self._security_group()
        self.bucket = self._artifacts_bucket()
        self.payload = payload_asset(self, "Payload", config)
        self.run_name = run_name(config)
        # The storage stack's, by its export: it outlives this stack.
        self.logs = logs.LogGroup.from_log_group_name(
            self, "Logs", cdk.Fn.import_value(log_group_export(config.storage_stack))
        )
        self.phase_parameters = [
            ssm.StringParameter(
                self,
                f"Node{rank}Phase",
                parameter_name=config.phase_parameter(rank),
                string_value=INITIAL_PHASE,
                description=f"Phase of node {rank}, written by its node agent",
            )
            for rank in range(config.num_nodes)
        ]
        self.stop = ssm.StringParameter(
            self,
            "Stop",
            parameter_name=config.stop_parameter,
            string_value=NO_STOP,
            description="Why the cluster stopped (failed or interrupted), by the first node",
        )
        self.role = self._node_role()
        self.nodes = self._nodes()
        self.main_address = ssm.StringParameter(
            self,
            "MainAddress",
            parameter_name=config.main_address_parameter,
            string_value=self.nodes[0].instance_private_ip,
            description="Private IP of node 0, the main node of fabric run",
        )
        # After the main address: a node that finds itself among the members (a redeploy's new
        # node) reads the new node 0's address, never the old one's.
        self.members = ssm.StringParameter(
            self,
            "Members",
            parameter_name=config.members_parameter,
            string_value=cdk.Fn.join(",", [node.instance_id for node in self.nodes]),
            description="The cluster's instance ids by rank: phases and stops of others are old",
        )
        self.members.node.add_dependency(self.main_address)
        self._outputs()

    def _network(self) -> ec2.Vpc:
        # One public subnet in one AZ: nodes are close together and no NAT gateway bills.
        vpc = ec2.Vpc(
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
            vpc,
            "AwsSolutions-VPC7",
            "The VPC holds only the short-lived training nodes; flow logs would add cost "
            "without a consumer. Node logs go to the journal and the boot log.",
        )
        return vpc

    def _security_group(self) -> ec2.SecurityGroup:
        group = ec2.SecurityGroup(
            self,
            "Nodes",
            vpc=self.vpc,
            description="Fabric cluster nodes: SSH from ssh_cidr, all TCP between nodes",
            allow_all_outbound=True,  # uv, PyPI and the PyTorch index at boot
        )
        ssh_peer = (
            ec2.Peer.ipv4(self.config.ssh_cidr) if self.config.ssh_cidr else ec2.Peer.ipv4(VPC_CIDR)
        )
        group.add_ingress_rule(ssh_peer, ec2.Port.tcp(22), "SSH")
        # gloo and NCCL open ephemeral ports beyond main_port between every pair of nodes.
        if self.config.efa:
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
        if self.config.ssh_cidr == "0.0.0.0/0":
            cdk.Annotations.of(group).add_warning_v2(
                "fabric:ssh-open-to-world",
                "ssh_cidr=0.0.0.0/0 opens SSH to the whole internet; prefer your own /32 or "
                "Session Manager (no SSH needed).",
            )
            ack(group, "AwsSolutions-EC23", "The user chose ssh_cidr=0.0.0.0/0 explicitly.")
        return group

    def _artifacts_bucket(self) -> s3.IBucket:
        if self.config.artifacts_bucket:
            # The user's own bucket: its runs go on there.
            return s3.Bucket.from_bucket_name(self, "Artifacts", self.config.artifacts_bucket)
        return s3.Bucket.from_bucket_name(
            self, "Artifacts", cdk.Fn.import_value(bucket_export(self.config.storage_stack))
        )

    def _node_role(self) -> iam.Role:
        role = iam.Role(
            self,
            "NodeRole",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="Fabric cluster node: Session Manager, its parameters, payload, artifacts",
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=list(SESSION_MANAGER_ACTIONS), resources=["*"])
        )
        self.payload.grant_read(role)
        # Read and put, no delete: nothing on a node removes artifacts.
        self.bucket.grant_read(role)
        self.bucket.grant_put(role)
        for parameter in self.phase_parameters:
            parameter.grant_write(role)  # its own; nodes read only the cluster's stop
        # One failed or stopped node stops them all: every node may write and read the stop.
        self.stop.grant_write(role)
        self.logs.grant_write(role)
        # By ARN, not through the parameters: they refer to the nodes, which depend on this role.
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ssm:GetParameter", "ssm:GetParameters"],
                resources=[
                    self.format_arn(
                        service="ssm", resource="parameter", resource_name=name.lstrip("/")
                    )
                    for name in (
                        self.config.main_address_parameter,
                        self.config.members_parameter,
                        self.config.stop_parameter,
                    )
                ],
            )
        )
        checkov_skip(
            role.node.find_child("DefaultPolicy"),
            ("CKV_AWS_111", SESSION_MANAGER_REASON),
        )
        for finding, reason in (
            (
                "Resource::*",
                SESSION_MANAGER_REASON,
            ),
            ("Action::s3:GetBucket*", "CDK grant_read of the payload asset and the bucket."),
            ("Action::s3:GetObject*", "CDK grant_read of the payload asset and the bucket."),
            ("Action::s3:List*", "CDK grant_read of the payload asset and the bucket."),
            ("Action::s3:Abort*", "Aborts its own failed multipart checkpoint uploads."),
            (
                f"Resource::{self._bucket_arn_as_nag_reads_it()}/*",
                "Nodes write checkpoints and metrics under any key of the cluster's own bucket.",
            ),
            (
                f"Resource::{self._asset_bucket_arn_as_nag_reads_it()}/*",
                "Read of the CDK asset bucket, where the payload zip lives.",
            ),
            (
                f"Resource::{self._log_group_arn_as_nag_reads_it()}",
                "Writes its own streams in the storage stack's log group (a stream per node).",
            ),
        ):
            ack(role, f"AwsSolutions-IAM5[{finding}]", reason)
        return role

    def _partition_as_nag_reads_it(self) -> tuple[str, str]:
        """The partition and region:account of an ARN as cdk-nag prints it: literal with
        credentials at synth (an environment), intrinsics without."""
        if cdk.Token.is_unresolved(self.account) or cdk.Token.is_unresolved(self.region):
            return "<AWS::Partition>", "<AWS::Region>:<AWS::AccountId>"
        return self.partition, f"{self.region}:{self.account}"

    def _bucket_arn_as_nag_reads_it(self) -> str:
        # The storage stack's bucket appears by its export's name (an Fn::ImportValue).
        name = self.config.artifacts_bucket or bucket_export(self.config.storage_stack)
        return f"arn:{self._partition_as_nag_reads_it()[0]}:s3:::{name}"

    def _log_group_arn_as_nag_reads_it(self) -> str:
        partition, where = self._partition_as_nag_reads_it()
        group = log_group_export(self.config.storage_stack)
        return f"arn:{partition}:logs:{where}:log-group:{group}:*"

    def _asset_bucket_arn_as_nag_reads_it(self) -> str:
        """Literal with credentials at synth (an environment), intrinsics without."""
        if cdk.Token.is_unresolved(self.account) or cdk.Token.is_unresolved(self.region):
            return "arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-<AWS::AccountId>-<AWS::Region>"
        return f"arn:{self.partition}:s3:::cdk-hnb659fds-assets-{self.account}-{self.region}"

    def _nodes(self) -> list[ec2.Instance]:
        config = self.config
        user_data = ec2.UserData.custom(
            render_boot_script(
                config,
                region=self.region,
                payload_url=self.payload.s3_object_url,
                artifacts_bucket=self.bucket.bucket_name,
                run_name=self.run_name,
                run_fingerprint=run_fingerprint(config),
                log_group=self.logs.log_group_name,
            )
        )
        profile = iam.InstanceProfile(self, "NodeProfile", role=self.role)
        placement_group = (
            ec2.PlacementGroup(self, "Placement", strategy=ec2.PlacementGroupStrategy.CLUSTER)
            if config.supports_cluster_placement_group
            else None
        )
        key_pair = (
            ec2.KeyPair.from_key_pair_name(self, "KeyPair", config.key_pair)
            if config.key_pair
            else None
        )
        image = self._machine_image()
        # The user data once, in the launch template every node starts from: inlined per node,
        # 64 nodes' copies alone would pass CloudFormation's 1 MB template limit.
        template = self._launch_template(user_data)
        # A one-time spot instance cannot be stopped: powering off terminates it.
        shutdown = (
            ec2.InstanceInitiatedShutdownBehavior.TERMINATE
            if config.spot
            else ec2.InstanceInitiatedShutdownBehavior.STOP
        )
        nodes = []
        for rank in range(config.num_nodes):
            node = ec2.Instance(
                self,
                f"Node{rank}",
                instance_type=ec2.InstanceType(config.instance_type),
                machine_image=image,
                vpc=self.vpc,
                vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
                security_group=self.security_group,
                instance_profile=profile,
                user_data=user_data,
                # EC2 runs user data only at an instance's first boot: a node whose user data
                # changes (payload, settings) must be a new instance, or it runs the old code.
                # The logical id carries the user data's hash; the template's new version
                # (LaunchTemplate is create-only) replaces the instance as well.
                user_data_causes_replacement=True,
                key_pair=key_pair,
                placement_group=placement_group,
                http_tokens=ec2.HttpTokens.REQUIRED,
                instance_metadata_tags=True,
                instance_initiated_shutdown_behavior=shutdown,
                block_devices=[
                    ec2.BlockDevice(
                        device_name=ROOT_DEVICE,
                        volume=ec2.BlockDeviceVolume.ebs(
                            config.volume_gb,
                            encrypted=True,
                            volume_type=ec2.EbsDeviceVolumeType.GP3,
                            delete_on_termination=True,
                        ),
                    )
                ],
            )
            cdk.Tags.of(node).add(TAG_NODE_RANK, str(rank))
            cdk.Tags.of(node).add(TAG_NUM_NODES, str(config.num_nodes))
            node.instance.add_property_deletion_override("UserData")  # the template's
            node.instance.launch_template = ec2.CfnInstance.LaunchTemplateSpecificationProperty(
                launch_template_id=template.launch_template_id,
                version=template.latest_version_number,
            )
            if config.efa:  # the template's EFA interface carries the subnet and the group
                node.instance.add_property_deletion_override("SubnetId")
                node.instance.add_property_deletion_override("SecurityGroupIds")
            ack(
                node,
                "AwsSolutions-EC28",
                "Training nodes live for one run; detailed monitoring would bill per node.",
            )
            ack(
                node,
                "AwsSolutions-EC29",
                "Nodes are disposable by design (cdk destroy); their results are in the "
                "retained artifacts bucket.",
            )
            nodes.append(node)
        return nodes

    def _machine_image(self) -> ec2.IMachineImage:
        """The node AMI, fixed per deploy: ImageId is create-only, so an image that changed
        on its own would replace every node at an unrelated redeploy."""
        if self.config.ami:
            return PinnedImage(self.config.ami)
        parameter = self.ami_parameter
        if cdk.Token.is_unresolved(self.account) or cdk.Token.is_unresolved(self.region):
            # Without an account (no credentials at synth) nothing can be looked up.
            cdk.Annotations.of(self).add_warning_v2(
                "fabric:ami-not-pinned",
                f"ami: no AWS account and region at synth, so the image of {parameter} is "
                "read at every deploy; deploy with credentials (it is then recorded in "
                "cdk.context.json) or pass -c ami=ami-...",
            )
            return ec2.MachineImage.from_ssm_parameter(parameter, os=ec2.OperatingSystemType.LINUX)
        # Looked up once by the CDK CLI and recorded in cdk.context.json (the same key as
        # MachineImage.from_ssm_parameter(cached_in_context=True)). Until the CLI has looked
        # it up, a well-formed placeholder lets this first pass pass validation.
        image_id = cdk.ContextProvider.get_value(
            self,
            provider="ssm",  # cloud_assembly_schema.ContextProvider.SSM_PARAMETER_PROVIDER
            props={"parameterName": parameter},
            dummy_value=AMI_PLACEHOLDER,
        ).value
        return PinnedImage(image_id)

    @property
    def ami_parameter(self) -> str:
        return GPU_AMI_PARAMETER if self.config.accelerator == "gpu" else UBUNTU_AMI_PARAMETER

    def _launch_template(self, user_data: ec2.UserData) -> ec2.LaunchTemplate:
        """The nodes' user data (once for all), and what AWS::EC2::Instance takes only through
        a launch template: one-time spot requests and EFA interfaces."""
        config = self.config
        template = ec2.LaunchTemplate(
            self,
            "NodeTemplate",
            user_data=user_data,
            spot_options=ec2.LaunchTemplateSpotOptions(
                request_type=ec2.SpotRequestType.ONE_TIME,
                interruption_behavior=ec2.SpotInstanceInterruption.TERMINATE,
            )
            if config.spot
            else None,
            require_imdsv2=True,
        )
        if config.efa:
            cfn = template.node.default_child
            cfn.add_property_override(
                "LaunchTemplateData.NetworkInterfaces",
                [
                    {
                        "DeviceIndex": 0,
                        "InterfaceType": "efa",
                        "SubnetId": self.vpc.public_subnets[0].subnet_id,
                        "Groups": [self.security_group.security_group_id],
                        "AssociatePublicIpAddress": True,  # no NAT: downloads go out directly
                        "DeleteOnTermination": True,
                    }
                ],
            )
            checkov_skip(
                template,
                (
                    "CKV_AWS_88",
                    "The VPC has no NAT gateway: nodes download uv, Python packages and the "
                    "payload through their public IP; the security group admits only SSH from "
                    "ssh_cidr and the nodes themselves.",
                ),
            )
        return template

    def _still_billed(self) -> str:
        config = self.config
        when = "stop_when_done" if config.stop_when_done else "stop_when_done off: nodes run on"
        nodes = (
            "spot nodes terminate when they power off: nothing is left of them"
            if config.spot
            else f"stopped nodes bill only their volumes ({config.num_nodes} x "
            f"{config.volume_gb} GB gp3)"
        )
        return (
            f"After a run ({when}; every node powers off after max_hours={config.max_hours} "
            f"anyway): {nodes}; the storage stack ({config.storage_stack}: the runs' bucket, the "
            "logs) bills its storage. make destroy removes this cluster; make destroy-storage "
            "the runs and logs."
        )

    def _outputs(self) -> None:
        for rank, node in enumerate(self.nodes):
            cdk.CfnOutput(self, f"Node{rank}InstanceId", value=node.instance_id)
            cdk.CfnOutput(self, f"Node{rank}PrivateIp", value=node.instance_private_ip)
            cdk.CfnOutput(
                self,
                f"Node{rank}Session",
                description=f"Shell on node {rank} through Session Manager",
                value=cdk.Fn.join(
                    "",
                    [
                        "aws ssm start-session --region ",
                        self.region,
                        " --target ",
                        node.instance_id,
                    ],
                ),
            )
        # Where the runs and logs are: the storage stack's outputs (an output may not re-export
        # an import); a bucket of the user's own, by its name.
        cdk.CfnOutput(self, "StorageStack", value=self.config.storage_stack)
        if self.config.artifacts_bucket:
            cdk.CfnOutput(self, "ArtifactsBucket", value=self.config.artifacts_bucket)
        cdk.CfnOutput(
            self,
            "RunName",
            description="The run this deploy trains: s3://<ArtifactsBucket>/<stack>/<run>/",
            value=self.run_name,
        )
        cdk.CfnOutput(
            self,
            "RunFingerprint",
            description="What the nodes train; a complete run with another one trains on",
            value=run_fingerprint(self.config),
        )
        cdk.CfnOutput(self, "StillBilled", value=self._still_billed())
        cdk.CfnOutput(self, "MainAddressParameter", value=self.config.main_address_parameter)
