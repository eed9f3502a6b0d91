"""The N identical nodes: their machine image, the launch template they start from, the
placement group, and the instances, tagged with their rank: one AWS::EC2::Instance per rank, or
(recover) one Auto Scaling group of one instance per rank, which replaces a lost node with a
new one of the same rank."""

from __future__ import annotations

import aws_cdk as cdk
import jsii
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

from stacks.config import TAG_CLUSTER, TAG_NODE_RANK, TAG_NUM_NODES, ClusterConfig
from stacks.nag import ack, checkov_skip

UBUNTU_AMI_PARAMETER = (
    "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
)
# The Deep Learning Base AMI: Ubuntu 24.04 with the NVIDIA driver, CUDA and the EFA software.
GPU_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
)
AMI_PLACEHOLDER = "ami-00000000000000000"  # until the CLI has looked the AMI up
ROOT_DEVICE = "/dev/sda1"  # Ubuntu AMIs' root device


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


def ami_parameter(config: ClusterConfig) -> str:
    """The public SSM parameter of the node AMI, for the accelerator."""
    return GPU_AMI_PARAMETER if config.accelerator == "gpu" else UBUNTU_AMI_PARAMETER


def machine_image(scope: Construct, config: ClusterConfig) -> ec2.IMachineImage:
    """The node AMI, fixed per deploy: ImageId is create-only, so an image that changed on its
    own would replace every node at an unrelated redeploy."""
    if config.ami:
        return PinnedImage(config.ami)
    parameter = ami_parameter(config)
    stack = cdk.Stack.of(scope)
    if cdk.Token.is_unresolved(stack.account) or cdk.Token.is_unresolved(stack.region):
        # Without an account (no credentials at synth) nothing can be looked up.
        cdk.Annotations.of(scope).add_warning_v2(
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
        scope,
        provider="ssm",  # cloud_assembly_schema.ContextProvider.SSM_PARAMETER_PROVIDER
        props={"parameterName": parameter},
        dummy_value=AMI_PLACEHOLDER,
    ).value
    return PinnedImage(image_id)


def root_volume(config: ClusterConfig) -> ec2.BlockDevice:
    """Every node's root volume: encrypted gp3 of volume_gb, gone with the instance."""
    return ec2.BlockDevice(
        device_name=ROOT_DEVICE,
        volume=ec2.BlockDeviceVolume.ebs(
            config.volume_gb,
            encrypted=True,
            volume_type=ec2.EbsDeviceVolumeType.GP3,
            delete_on_termination=True,
        ),
    )


class Nodes(Construct):
    """num_nodes instances of one type in the subnet and the group, each tagged with its rank and
    the cluster size, all started from one launch template (the user data, spot, EFA)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: ClusterConfig,
        vpc: ec2.IVpc,
        security_group: ec2.ISecurityGroup,
        role: iam.IRole,
        user_data: ec2.UserData,
    ) -> None:
        super().__init__(scope, construct_id)
        profile = iam.InstanceProfile(self, "Profile", role=role)
        self.placement_group = (
            ec2.PlacementGroup(self, "Placement", strategy=ec2.PlacementGroupStrategy.CLUSTER)
            if config.supports_cluster_placement_group
            else None
        )
        key_pair = (
            ec2.KeyPair.from_key_pair_name(self, "KeyPair", config.key_pair)
            if config.key_pair
            else None
        )
        image = machine_image(self, config)
        # The user data once, in the launch template every node starts from: inlined per node,
        # 64 nodes' copies alone would pass CloudFormation's 1 MB template limit.
        group_parts = self._group_parts(config, image, profile, key_pair) if config.recover else {}
        self.launch_template = self._launch_template(
            config, vpc, security_group, user_data, **group_parts
        )
        self.instances: list[ec2.Instance] = []
        self.groups: list[autoscaling.AutoScalingGroup] = []
        if config.recover:
            self.groups = [self._group(config, vpc, rank) for rank in range(config.num_nodes)]
            return
        # A one-time spot instance cannot be stopped: powering off terminates it.
        shutdown = (
            ec2.InstanceInitiatedShutdownBehavior.TERMINATE
            if config.spot
            else ec2.InstanceInitiatedShutdownBehavior.STOP
        )
        for rank in range(config.num_nodes):
            node = ec2.Instance(
                self,
                f"Node{rank}",
                instance_type=ec2.InstanceType(config.instance_type),
                machine_image=image,
                vpc=vpc,
                vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC),
                security_group=security_group,
                instance_profile=profile,
                user_data=user_data,
                # EC2 runs user data only at an instance's first boot: a node whose user data
                # changes (payload, settings) must be a new instance, or it runs the old code.
                # The logical id carries the user data's hash; the template's new version
                # (LaunchTemplate is create-only) replaces the instance as well.
                user_data_causes_replacement=True,
                key_pair=key_pair,
                placement_group=self.placement_group,
                http_tokens=ec2.HttpTokens.REQUIRED,
                instance_metadata_tags=True,
                instance_initiated_shutdown_behavior=shutdown,
                block_devices=[root_volume(config)],
            )
            cdk.Tags.of(node).add(TAG_NODE_RANK, str(rank))
            cdk.Tags.of(node).add(TAG_NUM_NODES, str(config.num_nodes))
            node.instance.add_property_deletion_override("UserData")  # the template's
            node.instance.launch_template = ec2.CfnInstance.LaunchTemplateSpecificationProperty(
                launch_template_id=self.launch_template.launch_template_id,
                version=self.launch_template.latest_version_number,
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
            self.instances.append(node)

    def _group_parts(
        self,
        config: ClusterConfig,
        image: ec2.IMachineImage,
        profile: iam.InstanceProfile,
        key_pair: ec2.IKeyPair | None,
    ) -> dict[str, object]:
        """What an AWS::EC2::Instance says itself and a group's instances take from the launch
        template: the image, the type, the profile, the volume, the group, tags in IMDS.
        Spot comes from the groups' mixed-instances policy, not from the template."""
        return {
            "machine_image": image,
            "instance_type": ec2.InstanceType(config.instance_type),
            "instance_profile": profile,
            "key_pair": key_pair,
            "instance_metadata_tags": True,
            # A node whose run is done powers off after its agent scaled the group to zero:
            # stopped, it is not taken for a failure and replaced.
            "instance_initiated_shutdown_behavior": ec2.InstanceInitiatedShutdownBehavior.STOP,
            "block_devices": [root_volume(config)],
        }

    def _group(
        self, config: ClusterConfig, vpc: ec2.IVpc, rank: int
    ) -> autoscaling.AutoScalingGroup:
        """Rank `rank`: a group of exactly one instance, replaced when it is reclaimed, fails
        its health check or is terminated; its tags, the rank among them, go with every
        instance it launches. A redeploy makes new groups beside the old (the instances'
        side by side) and then deletes the old."""
        template = self.launch_template
        mixed = None
        if config.spot:
            mixed = autoscaling.MixedInstancesPolicy(
                launch_template=template,
                launch_template_overrides=[
                    autoscaling.LaunchTemplateOverrides(instance_type=ec2.InstanceType(name))
                    for name in (config.instance_types or (config.instance_type,))
                ],
                instances_distribution=autoscaling.InstancesDistribution(
                    on_demand_base_capacity=0,
                    on_demand_percentage_above_base_capacity=0,
                    spot_allocation_strategy=autoscaling.SpotAllocationStrategy.PRICE_CAPACITY_OPTIMIZED,
                ),
            )
        group = autoscaling.AutoScalingGroup(
            self,
            f"Rank{rank}",
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnets=[vpc.public_subnets[0]]),
            launch_template=None if mixed else template,
            mixed_instances_policy=mixed,
            min_capacity=1,
            max_capacity=1,
            desired_capacity=1,
            health_checks=autoscaling.HealthChecks.ec2(grace_period=cdk.Duration.minutes(5)),
            update_policy=autoscaling.UpdatePolicy.replacing_update(),
        )
        cfn = group.node.default_child
        if self.placement_group:
            cfn.placement_group = self.placement_group.placement_group_name
        cdk.Tags.of(group).add(TAG_NODE_RANK, str(rank), apply_to_launched_instances=True)
        cdk.Tags.of(group).add(
            TAG_NUM_NODES, str(config.num_nodes), apply_to_launched_instances=True
        )
        cdk.Tags.of(group).add(TAG_CLUSTER, config.stack_name, apply_to_launched_instances=False)
        cdk.Annotations.of(group).acknowledge_warning(
            "@aws-cdk/aws-autoscaling:desiredCapacitySet",
            "One instance per rank, always: a deploy that resets the size to 1 is what it means.",
        )
        ack(
            group,
            "AwsSolutions-AS3",
            "Node 0 sees a replacement (and restarts the cluster), make status shows it: "
            "no notification topic.",
        )
        ack(
            group,
            "AwsSolutions-EC26",
            "The launch template's root volume is encrypted; cdk-nag cannot read it through a "
            "mixed-instances policy.",
        )
        return group

    def _launch_template(
        self,
        config: ClusterConfig,
        vpc: ec2.IVpc,
        security_group: ec2.ISecurityGroup,
        user_data: ec2.UserData,
        **group_parts: object,
    ) -> ec2.LaunchTemplate:
        """The nodes' user data (once for all), and what AWS::EC2::Instance takes only through
        a launch template: one-time spot requests and EFA interfaces; with recover, all that a
        group's instance starts from (group_parts), spot from the groups' policy."""
        template = ec2.LaunchTemplate(
            self,
            "Template",
            user_data=user_data,
            spot_options=ec2.LaunchTemplateSpotOptions(
                request_type=ec2.SpotRequestType.ONE_TIME,
                interruption_behavior=ec2.SpotInstanceInterruption.TERMINATE,
            )
            if config.spot and not config.recover
            else None,
            require_imdsv2=True,
            # recover: the group's instances are in the nodes' group (an EFA interface says it).
            security_group=security_group if config.recover and not config.efa else None,
            **group_parts,  # type: ignore[arg-type]
        )
        if config.efa:
            cfn = template.node.default_child
            cfn.add_property_override(
                "LaunchTemplateData.NetworkInterfaces",
                [
                    {
                        "DeviceIndex": 0,
                        "InterfaceType": "efa",
                        # A group gives its instances the subnet (VPCZoneIdentifier) itself.
                        **({} if config.recover else {"SubnetId": vpc.public_subnets[0].subnet_id}),
                        "Groups": [security_group.security_group_id],
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
