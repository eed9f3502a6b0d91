"""AWS access for the console: the session and its clients, the stack's outputs, the nodes'
phases and instance states, small S3 reads, and every AWS failure as one line.

The region is the one the CDK CLI deployed to (`--region`, then `AWS_REGION`, then boto3's
own: `AWS_DEFAULT_REGION` or the profile), since boto3 alone ignores `AWS_REGION`.
Throttling is normal here (Parameter Store ~40 TPS per account, CloudWatch Logs
FilterLogEvents 5 TPS per account, CloudFormation's describe calls too): every client retries
with backoff and client-side rate limiting, and what still comes through is one line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as AwsConnectionError

from stacks.config import phase_parameter_template
from userdata.aws_clients import MAX_ATTEMPTS, THROTTLED_CODES, retries, retrying
from userdata.phase import decode_phase

DEFAULT_STACK = "FabricCluster"
DEFAULT_STORAGE_STACK = "FabricStorage"
CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"
NO_CREDENTIALS = "no AWS credentials: configure them (aws configure) or set AWS_PROFILE"
NO_REGION = "no AWS region: set AWS_REGION (or aws configure), or pass --region"
# Throttling is worth waiting out (userdata/aws_clients.py: MAX_ATTEMPTS, standard mode) unless
# AWS_MAX_ATTEMPTS or the profile's max_attempts says otherwise; an endpoint that cannot be
# reached is given up after a few attempts, and each connect waits at most:
CONNECT_TIMEOUT_S = 5
# The parameter the node agent writes (userdata/phase.py); get_parameters takes 10 names a call.
GET_PARAMETERS_MAX = 10
NODE_OUTPUT = re.compile(r"^Node(\d+)InstanceId$")
GROUP_OUTPUT = re.compile(r"^Node(\d+)Group$")  # recover: the rank's group, its instance changes


class ConsoleError(Exception):
    """A failure the console reports as one line, `error: ...`, with exit status 2."""


def default_stack_name(cdk_json: Path = CDK_JSON, key: str = "stack_name") -> str:
    """The stack `make deploy` creates: cdk.json's context.stack_name (key=storage_stack: its
    storage stack)."""
    fallback = DEFAULT_STORAGE_STACK if key == "storage_stack" else DEFAULT_STACK
    try:
        context = json.loads(cdk_json.read_text()).get("context", {})
    except (OSError, ValueError, AttributeError):
        return fallback
    name = context.get(key) if isinstance(context, dict) else None
    return name if isinstance(name, str) and name else fallback


def is_throttled(error: BaseException) -> bool:
    if not isinstance(error, ClientError):
        return False
    details = error.response.get("Error", {})
    return (
        details.get("Code") in THROTTLED_CODES
        or "rate exceeded" in str(details.get("Message", "")).lower()
    )


def explain(error: BaseException) -> str | None:
    """The one line a user reads for an AWS failure; None for an error that is a bug."""
    if isinstance(error, ConsoleError):
        text = str(error)
    elif isinstance(error, NoCredentialsError):
        text = NO_CREDENTIALS
    elif isinstance(error, NoRegionError):
        text = NO_REGION
    elif isinstance(error, ProfileNotFound):
        text = f"{error}: check AWS_PROFILE or ~/.aws/config"
    elif isinstance(error, AwsConnectionError | HTTPClientError):  # refused, timeout, TLS, proxy
        endpoint = error.kwargs.get("endpoint_url") or "the AWS endpoint"
        text = (
            f"cannot reach {endpoint}: check the network, --region, or AWS_ENDPOINT_URL "
            f"({type(error).__name__})"
        )
    elif isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code, message = details.get("Code", "?"), details.get("Message", "")
        if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
            text = f"AWS credentials have expired ({code}): refresh them (aws sso login, ...)"
        elif code in (
            "InvalidClientTokenId",
            "UnrecognizedClientException",
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
        ):
            text = f"AWS rejected the credentials ({code}): check aws sts get-caller-identity"
        elif is_throttled(error):
            attempts = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            text = (
                f"AWS throttled {error.operation_name} ({code}: {message or 'Rate exceeded'}) "
                f"after {attempts} attempt(s): too many calls in this account and region just "
                "now; retry in a minute"
            )
        else:
            text = f"AWS refused {error.operation_name}: {code}: {message}"
    elif isinstance(error, BotoCoreError):
        text = f"AWS: {error}"
    elif isinstance(error, Boto3Error):  # an S3 transfer (download_file) that gave up
        cause = getattr(error, "last_exception", None)
        text = f"S3 transfer failed: {error}" + (f" ({cause})" if cause else "")
    else:
        return None
    return " ".join(text.split())  # one line, whatever the service put in its message


def client_config(max_attempts: int) -> Config:
    return Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=30,
        retries=retries(max_attempts),
        user_agent_extra="fabric-console",
    )


@dataclass
class Aws:
    """One session for a command: one region, one set of credentials, clients made once."""

    session: boto3.Session
    max_attempts: int = MAX_ATTEMPTS  # for each call, throttled ones included
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def region(self) -> str:
        return self.session.region_name or ""

    def client(self, service: str) -> Any:
        if service not in self._clients:
            client = self.session.client(service, config=client_config(self.max_attempts))
            self._clients[service] = retrying(client)
        return self._clients[service]


def choose_region(region: str | None) -> str | None:
    """The region the CDK CLI deploys to: --region, then AWS_REGION (which boto3 ignores), then
    None for boto3's own choice (AWS_DEFAULT_REGION, the profile's region)."""
    return region or os.environ.get("AWS_REGION") or None


def connect(region: str | None) -> Aws:
    """Fails before any request when there is no region or no credentials, so the user gets
    the one reason and not a signing error from the middle of a command."""
    core = botocore.session.Session()
    try:
        session = boto3.Session(botocore_session=core, region_name=choose_region(region))
        if not session.region_name:
            raise ConsoleError(NO_REGION)
        if session.get_credentials() is None:
            raise ConsoleError(NO_CREDENTIALS)
        configured = core.get_config_variable("max_attempts")  # AWS_MAX_ATTEMPTS, the profile
    except ProfileNotFound as error:
        raise ConsoleError(explain(error)) from error
    return Aws(session, int(configured or MAX_ATTEMPTS))


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def no_stack_message(name: str, region: str) -> str:
    return (
        f"no stack {name} in region {region}: deploy it with make deploy, or pass --stack/--region"
    )


STORAGE_OUTPUT = "StorageStack"  # a cluster stack's output: the name of its storage stack


@dataclass(frozen=True)
class Stack:
    """What a deployed stack publishes in its outputs (see stacks/)."""

    name: str
    region: str
    status: str
    outputs: dict[str, str]

    def output(self, key: str) -> str:
        value = self.outputs.get(key)
        if not value:
            raise ConsoleError(
                f"stack {self.name} ({self.status}) has no output {key}: it is still being "
                "created, or was deployed by an older version of this app (make deploy)"
            )
        return value

    @property
    def bucket(self) -> str:
        return self.output("ArtifactsBucket")

    @property
    def run(self) -> str:
        return self.output("RunName")

    @property
    def log_group(self) -> str:
        return self.output("LogGroup")

    @property
    def instance_ids(self) -> list[str]:
        """Instance ids by rank (index = node rank)."""
        by_rank = {
            int(match.group(1)): value
            for key, value in self.outputs.items()
            if (match := NODE_OUTPUT.match(key))
        }
        if not by_rank:
            self.output("Node0InstanceId")  # raises the missing-output error
        return [by_rank.get(rank, "") for rank in range(max(by_rank) + 1)]


def load_stack(aws: Aws, name: str) -> Stack:
    try:
        answer = aws.client("cloudformation").describe_stacks(StackName=name)
    except ClientError as error:
        if error_code(error) == "ValidationError" and "does not exist" in str(error):
            raise ConsoleError(no_stack_message(name, aws.region)) from error
        raise
    stack = answer["Stacks"][0]
    outputs = {item["OutputKey"]: item.get("OutputValue", "") for item in stack.get("Outputs", [])}
    storage = outputs.get(STORAGE_OUTPUT)
    if storage and storage != name:
        # A cluster's runs and logs live in its storage stack: its bucket (unless the cluster
        # names its own) and its log group.
        outputs = {**load_stack(aws, storage).outputs, **outputs}
    outputs.update(group_instances(aws, outputs))
    return Stack(name=name, region=aws.region, status=stack["StackStatus"], outputs=outputs)


def group_instances(aws: Aws, outputs: dict[str, str]) -> dict[str, str]:
    """recover: the instance each rank's group holds now, as Node<rank>InstanceId ("" while it
    has none: a replacement launching, or the group at zero after the run)."""
    groups = {
        value: int(m.group(1)) for key, value in outputs.items() if (m := GROUP_OUTPUT.match(key))
    }
    if not groups:
        return {}
    found = {f"Node{rank}InstanceId": "" for rank in groups.values()}
    pages = (
        aws.client("autoscaling")
        .get_paginator("describe_auto_scaling_groups")
        .paginate(AutoScalingGroupNames=list(groups))
    )
    for page in pages:
        for group in page.get("AutoScalingGroups", []):
            live = [
                instance["InstanceId"]
                for instance in group.get("Instances", [])
                if not instance.get("LifecycleState", "").startswith("Terminat")
            ]
            if group["AutoScalingGroupName"] in groups and live:
                found[f"Node{groups[group['AutoScalingGroupName']]}InstanceId"] = live[0]
    return found


@dataclass(frozen=True)
class NodePhase:
    rank: int
    phase: str | None  # None: the instance that holds the rank has not reported a phase yet
    since: datetime | None  # when the phase was recorded (the parameter's LastModifiedDate)
    note: str = ""  # what another instance (an old node during a redeploy) wrote last


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _utc(moment: datetime | None) -> datetime | None:
    return moment.astimezone(UTC) if moment else None


def read_phases(aws: Aws, stack: str, instance_ids: Sequence[str]) -> list[NodePhase]:
    """Each rank's phase as written by the instance that holds the rank now (instance_ids, by
    rank). During a redeploy the old and the new nodes run side by side and write the same
    parameters: a value another instance wrote is set aside for the newest one the holder
    wrote, from the parameter's history (read only then). A value without a writer (the
    stack's initial `booting`) is shown as it is."""
    template = phase_parameter_template(stack)
    names = [template.format(rank=rank) for rank in range(len(instance_ids))]
    found: dict[str, dict[str, Any]] = {}
    ssm = aws.client("ssm")
    for batch in chunks(names, GET_PARAMETERS_MAX):
        for parameter in ssm.get_parameters(Names=list(batch)).get("Parameters", []):
            found[parameter["Name"]] = parameter
    phases = []
    for rank, name in enumerate(names):
        parameter = found.get(name)
        if parameter is None:
            phases.append(NodePhase(rank, None, None))
            continue
        latest = decode_phase(str(parameter.get("Value", "")))
        since = _utc(parameter.get("LastModifiedDate"))
        holder = instance_ids[rank]
        if latest.instance is None or latest.instance == holder:
            phases.append(NodePhase(rank, latest.text, since))
            continue
        note = f"old instance {latest.instance} wrote: {latest.text}"
        own = holder_phase(aws, name, holder) if holder else None
        if own is None:
            phases.append(NodePhase(rank, None, None, note))
        else:
            phases.append(NodePhase(rank, own[0], own[1], note))
    return phases


def holder_phase(aws: Aws, name: str, holder: str) -> tuple[str, datetime | None] | None:
    """The newest value of the parameter that holder wrote (SSM lists history oldest first)."""
    newest = None
    pages = aws.client("ssm").get_paginator("get_parameter_history").paginate(Name=name)
    try:
        for page in pages:
            for version in page.get("Parameters", []):
                phase = decode_phase(str(version.get("Value", "")))
                if phase.instance == holder:
                    newest = (phase.text, _utc(version.get("LastModifiedDate")))
    except ClientError as error:
        if error_code(error) == "AccessDeniedException":  # a role without the history: a nicety
            return None
        raise
    return newest


def instance_states(aws: Aws, instance_ids: Sequence[str]) -> dict[str, str]:
    """State by instance id; an id EC2 no longer knows is absent (a filter, unlike InstanceIds,
    does not fail the whole call for one unknown id)."""
    ids = [instance_id for instance_id in instance_ids if instance_id]
    if not ids:
        return {}
    states: dict[str, str] = {}
    pages = (
        aws.client("ec2")
        .get_paginator("describe_instances")
        .paginate(Filters=[{"Name": "instance-id", "Values": ids}])
    )
    for page in pages:
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                states[instance["InstanceId"]] = instance.get("State", {}).get("Name", "?")
    return states


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    modified: datetime


def list_objects(aws: Aws, bucket: str, prefix: str) -> list[S3Object]:
    objects = []
    try:
        for page in (
            aws.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            for item in page.get("Contents", []):
                objects.append(
                    S3Object(item["Key"], int(item.get("Size", 0)), item["LastModified"])
                )
    except ClientError as error:
        raise _bucket_error(error, bucket) from error
    return objects


def list_prefixes(aws: Aws, bucket: str, prefix: str) -> list[str]:
    """The 'folders' directly under prefix, without it and without the trailing slash."""
    names = []
    try:
        for page in (
            aws.client("s3")
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        ):
            for item in page.get("CommonPrefixes", []):
                names.append(item["Prefix"][len(prefix) :].rstrip("/"))
    except ClientError as error:
        raise _bucket_error(error, bucket) from error
    return [name for name in names if name]


def _bucket_error(error: ClientError, bucket: str) -> Exception:
    if error_code(error) == "NoSuchBucket":
        return ConsoleError(f"no bucket {bucket}: it was deleted, or is in another account")
    return error


def read_json(
    aws: Aws, bucket: str, key: str, version_id: str | None = None
) -> dict[str, Any] | None:
    """A small JSON object written by the script or the agent; None when it is not there or
    is not a JSON object (a script's file is never a reason for the console to fail)."""
    extra = {"VersionId": version_id} if version_id else {}
    try:
        body = aws.client("s3").get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    except ClientError as error:
        if error_code(error) in ("NoSuchKey", "404", "NoSuchVersion", "InvalidArgument"):
            return None
        raise _bucket_error(error, bucket) from error
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def previous_version(aws: Aws, bucket: str, key: str) -> tuple[str, datetime] | None:
    """The version of key before the current one, and its date: the artifacts bucket is
    versioned, so an earlier progress.json is there to measure a step rate from one look."""
    try:
        answer = aws.client("s3").list_object_versions(Bucket=bucket, Prefix=key, MaxKeys=10)
    except ClientError:
        return None  # no permission to list versions: a rate from one look is a nicety
    # S3 lists a key's versions newest first; the first that is not the latest is the one before.
    for version in answer.get("Versions", []):
        if version.get("Key") == key and not version.get("IsLatest"):
            version_id = version.get("VersionId")
            if version_id and version_id != "null":
                return version_id, version["LastModified"]
            return None
    return None
