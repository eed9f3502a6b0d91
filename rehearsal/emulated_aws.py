"""The emulated AWS of a rehearsal: a moto server, bootstrapped like `cdk bootstrap` would.

It listens on 127.0.0.1 (for this process) and on a unix socket (for the nodes in their network
namespaces, through rehearsal/forward.py); both serve the same in-process moto backends.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from rehearsal.throttling import Throttle, ThrottledMotoServer, random_share
from stacks.config import parameter_prefix
from userdata.imds import TAG_CLUSTER, TAG_NODE_RANK

ACCOUNT = "123456789012"  # moto's account
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
CREDENTIAL_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
BOOTSTRAP_VERSION_PARAMETER = "/cdk-bootstrap/hnb659fds/version"
# moto reserves /aws/... parameters: the template's AMI parameter is pointed here instead.
AMI_PARAMETER = "/rehearsal/ubuntu-ami"
SOCKET_PARENT = "/tmp"


@dataclass(frozen=True)
class EmulatedInstance:
    rank: int
    instance_id: str
    private_ip: str
    tags: dict[str, str]
    user_data: str


# The rehearsal's own reads: it must not fail where the nodes would retry.
CHECK_CONFIG = Config(retries={"mode": "standard", "max_attempts": 10})


class EmulatedAws:
    """throttle_share: the share of SSM and CloudWatch Logs calls refused with
    ThrottlingException, on both servers, as a busy account refuses them."""

    def __init__(self, throttle_share: float = 0.0) -> None:
        # A unix socket's path must fit in 108 bytes (sun_path), which a deep TMPDIR (pytest's,
        # one per xdist worker) exceeds: the socket gets a short folder of its own.
        self.socket_folder = Path(tempfile.mkdtemp(prefix="fabric-aws-", dir=SOCKET_PARENT))
        self.socket_path = self.socket_folder / "aws.sock"
        self._tcp = ThrottledMotoServer("127.0.0.1", 0, random_share(throttle_share, seed=1))
        self._unix = ThrottledMotoServer(
            f"unix://{self.socket_path}", 0, random_share(throttle_share, seed=2)
        )

    def start(self) -> EmulatedAws:
        self._tcp.start()
        self._unix.start()
        host, port = self._tcp.get_host_and_port()
        self.port = port
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._tcp.stop()
        self._unix.stop()
        shutil.rmtree(self.socket_folder, ignore_errors=True)

    region = REGION  # as console.aws.Aws has it: the console's commands run against this too

    def client(self, service: str) -> Any:
        return boto3.client(
            service, endpoint_url=self.url, region_name=REGION, config=CHECK_CONFIG, **CREDENTIALS
        )

    @property
    def node_throttle(self) -> Throttle:
        """What the nodes' calls met (they reach the emulated AWS through the unix socket)."""
        return self._unix.throttle


def zip_directory(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def bootstrap_and_upload(aws: EmulatedAws, assembly: Path, stack_artifact: str) -> int:
    """What `cdk bootstrap` and `cdk deploy`'s asset publishing do; returns the assets uploaded."""
    ssm, s3, ec2 = aws.client("ssm"), aws.client("s3"), aws.client("ec2")
    ssm.put_parameter(Name=BOOTSTRAP_VERSION_PARAMETER, Value="30", Type="String", Overwrite=True)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ssm.put_parameter(Name=AMI_PARAMETER, Value=image, Type="String", Overwrite=True)
    manifest = json.loads((assembly / f"{stack_artifact}.assets.json").read_text())
    uploaded = 0
    for asset in manifest["files"].values():
        source = assembly / asset["source"]["path"]
        body = (
            zip_directory(source)
            if asset["source"].get("packaging") == "zip"
            else source.read_bytes()
        )
        for destination in asset["destinations"].values():
            bucket = (
                destination["bucketName"]
                .replace("${AWS::AccountId}", ACCOUNT)
                .replace("${AWS::Region}", REGION)
            )
            try:
                s3.create_bucket(Bucket=bucket)
            except ClientError as error:
                if error.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                    raise
            s3.put_object(Bucket=bucket, Key=destination["objectKey"], Body=body)
            uploaded += 1
    return uploaded


def ensure_stack(
    aws: EmulatedAws, template_path: Path, stack_name: str
) -> tuple[bool, dict[str, str]]:
    """The long-lived storage stack, as `cdk deploy` of a cluster deploys it first: created
    when it does not exist yet, kept as it is otherwise; (created, its outputs)."""
    try:
        stack = aws.client("cloudformation").describe_stacks(StackName=stack_name)["Stacks"][0]
    except ClientError:
        return True, deploy(aws, template_path, stack_name)
    return False, {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def deploy(aws: EmulatedAws, template_path: Path, stack_name: str) -> dict[str, str]:
    """Creates the stack through CloudFormation's API; returns its outputs."""
    template = json.loads(template_path.read_text())
    for parameter in template.get("Parameters", {}).values():
        if parameter.get("Type") == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>":
            parameter["Default"] = AMI_PARAMETER
    cloudformation = aws.client("cloudformation")
    cloudformation.create_stack(
        StackName=stack_name, TemplateBody=json.dumps(template), Capabilities=["CAPABILITY_IAM"]
    )
    cloudformation.get_waiter("stack_create_complete").wait(
        StackName=stack_name, WaiterConfig={"Delay": 1, "MaxAttempts": 120}
    )
    stack = cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
    return {output["OutputKey"]: output["OutputValue"] for output in stack.get("Outputs", [])}


def launch_template_user_data(aws: EmulatedAws, stack_name: str) -> str:
    """The user data of the stack's launch template. EC2 gives an instance its template's user
    data; moto's CloudFormation ignores an instance's LaunchTemplate, so the rehearsal does."""
    resources = aws.client("cloudformation").list_stack_resources(StackName=stack_name)
    (template_id,) = [
        r["PhysicalResourceId"]
        for r in resources["StackResourceSummaries"]
        if r["ResourceType"] == "AWS::EC2::LaunchTemplate"
    ]
    versions = aws.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=template_id, Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    return base64.b64decode(versions[0]["LaunchTemplateData"]["UserData"]).decode()


def stack_instances(aws: EmulatedAws, stack_name: str) -> list[EmulatedInstance]:
    """The stack's nodes that run: its instances, or (recover) those of its groups, which
    carry no CloudFormation tag of their own."""
    ec2 = aws.client("ec2")
    found = []
    template_user_data: str | None = None
    running = {"Name": "instance-state-name", "Values": ["pending", "running"]}
    by_stack = [{"Name": "tag:aws:cloudformation:stack-name", "Values": [stack_name]}, running]
    reservations = ec2.describe_instances(Filters=by_stack)["Reservations"]
    in_groups = group_instances(aws, stack_name)
    if in_groups:
        reservations += ec2.describe_instances(InstanceIds=in_groups, Filters=[running])[
            "Reservations"
        ]
    for reservation in reservations:
        for instance in reservation["Instances"]:
            tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
            own = ec2.describe_instance_attribute(
                InstanceId=instance["InstanceId"], Attribute="userData"
            )["UserData"].get("Value")
            if not own and template_user_data is None:
                template_user_data = launch_template_user_data(aws, stack_name)
            found.append(
                EmulatedInstance(
                    rank=int(tags[TAG_NODE_RANK]),
                    instance_id=instance["InstanceId"],
                    private_ip=instance["PrivateIpAddress"],
                    tags=tags,
                    user_data=base64.b64decode(own).decode() if own else template_user_data or "",
                )
            )
    return sorted(found, key=lambda node: node.rank)


def stack_groups(aws: EmulatedAws, stack_name: str) -> list[dict[str, Any]]:
    """The stack's Auto Scaling groups (recover: one per rank), as Auto Scaling describes them."""
    names = [
        resource["PhysicalResourceId"]
        for resource in aws.client("cloudformation").list_stack_resources(StackName=stack_name)[
            "StackResourceSummaries"
        ]
        if resource.get("ResourceType") == "AWS::AutoScaling::AutoScalingGroup"
    ]
    if not names:
        return []
    groups = aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=names)
    return list(groups["AutoScalingGroups"])


def group_instances(aws: EmulatedAws, stack_name: str) -> list[str]:
    return [
        instance["InstanceId"]
        for group in stack_groups(aws, stack_name)
        for instance in group.get("Instances", [])
    ]


def destroy(aws: EmulatedAws, stack_name: str, vpc_cidr: str) -> list[str]:
    """`cdk destroy`: deletes the stack; returns the emulator workarounds it needed."""
    notes = []
    ec2 = aws.client("ec2")
    try:
        aws.client("cloudformation").delete_stack(StackName=stack_name)
    except ClientError as error:
        if error.response["Error"]["Code"] != "DependencyViolation":
            raise
        # moto keeps the primary network interface of a terminated instance (EC2 deletes it),
        # so the VPC could not go; finish what CloudFormation would have done.
        notes.append(
            f"moto: {error.response['Error']['Message']} (kept ENIs of terminated "
            "instances); removed them and the VPC by hand"
        )
        for vpc in ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": [vpc_cidr]}])["Vpcs"]:
            _delete_vpc(ec2, vpc["VpcId"])
    return notes


def _delete_vpc(ec2: Any, vpc_id: str) -> None:
    by_vpc = [{"Name": "vpc-id", "Values": [vpc_id]}]
    for interface in ec2.describe_network_interfaces(Filters=by_vpc)["NetworkInterfaces"]:
        ec2.delete_network_interface(NetworkInterfaceId=interface["NetworkInterfaceId"])
    for subnet in ec2.describe_subnets(Filters=by_vpc)["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    gateways = ec2.describe_internet_gateways(
        Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}]
    )["InternetGateways"]
    for gateway in gateways:
        ec2.detach_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"], VpcId=vpc_id)
        ec2.delete_internet_gateway(InternetGatewayId=gateway["InternetGatewayId"])
    for table in ec2.describe_route_tables(Filters=by_vpc)["RouteTables"]:
        if not any(association.get("Main") for association in table.get("Associations", [])):
            ec2.delete_route_table(RouteTableId=table["RouteTableId"])
    ec2.delete_vpc(VpcId=vpc_id)


def remaining(
    aws: EmulatedAws, stack_name: str, vpc_cidr: str, bucket: str
) -> dict[str, list[str]]:
    """What the stack left behind, by kind (the artifacts bucket is kept on purpose)."""
    ec2, ssm, s3, iam = aws.client("ec2"), aws.client("ssm"), aws.client("s3"), aws.client("iam")
    # The stack's own instances, and any a group launched (they carry the rank, not the stack).
    live = [
        instance["InstanceId"]
        for tagged in (
            {"Name": "tag:aws:cloudformation:stack-name", "Values": [stack_name]},
            {"Name": "tag-key", "Values": [TAG_NODE_RANK]},
        )
        for reservation in ec2.describe_instances(Filters=[tagged])["Reservations"]
        for instance in reservation["Instances"]
        if instance["State"]["Name"] != "terminated"
    ]
    parameters = ssm.get_parameters_by_path(Path=parameter_prefix(stack_name), Recursive=True)
    return {
        "instances": live,
        "vpcs": [
            v["VpcId"]
            for v in ec2.describe_vpcs(Filters=[{"Name": "cidr", "Values": [vpc_cidr]}])["Vpcs"]
        ],
        "parameters": [p["Name"] for p in parameters["Parameters"]],
        "roles": [
            r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(stack_name)
        ],
        "buckets": [b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"] == bucket],
        # recover: the ranks' groups go with it, and their instances (above).
        "groups": [
            group["AutoScalingGroupName"]
            for group in aws.client("autoscaling").describe_auto_scaling_groups(
                Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [stack_name]}]
            )["AutoScalingGroups"]
        ],
        # shared_fs=efs: the cluster's file system goes with it (the runs are in the bucket).
        "file systems": [
            f["FileSystemId"] for f in aws.client("efs").describe_file_systems()["FileSystems"]
        ],
    }
