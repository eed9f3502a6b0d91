"""`destroy-storage`: deletes the storage stack and what it holds (every run of every cluster in
its bucket, the nodes' logs), after saying what that is and asking; and where `runs` finds the
bucket of a cluster that no longer exists.

The bucket and the log group are retained by CloudFormation (a stray `cdk destroy` of the
storage stack keeps them), so this command empties and deletes them itself, after the stack is
gone. It refuses while a cluster stack still uses the storage (`make destroy` first)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from botocore.exceptions import ClientError

from console.aws import STORAGE_OUTPUT, Aws, ConsoleError, Stack, error_code, load_stack
from console.results import format_size

DELETE_BATCH = 1000  # S3's DeleteObjects takes at most 1000 keys


@dataclass
class StoragePlan:
    storage: Stack
    bucket: str
    log_group: str
    runs: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # "<stack>/<run>" -> (objects, bytes)
    log_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.runs.values())

    def describe(self) -> list[str]:
        lines = [f"storage stack {self.storage.name} ({self.storage.region}):"]
        lines.append(
            f"  bucket s3://{self.bucket}: {len(self.runs)} run(s), "
            f"{format_size(self.total_bytes)} (every version)"
        )
        for run, (objects, size) in sorted(self.runs.items()):
            lines.append(f"    {run}: {objects} object version(s), {format_size(size)}")
        lines.append(f"  log group {self.log_group}: {format_size(self.log_bytes)} stored")
        return lines


def users(aws: Aws, storage: str) -> list[str]:
    """The cluster stacks that name this storage stack (their StorageStack output)."""
    found = []
    for page in aws.client("cloudformation").get_paginator("describe_stacks").paginate():
        for stack in page.get("Stacks", []):
            outputs = {o["OutputKey"]: o.get("OutputValue") for o in stack.get("Outputs", [])}
            if outputs.get(STORAGE_OUTPUT) == storage and stack["StackStatus"] != "DELETE_COMPLETE":
                found.append(stack["StackName"])
    return sorted(found)


def versions(aws: Aws, bucket: str) -> list[dict[str, object]]:
    """Every object version and delete marker of the bucket: {"Key", "VersionId", "Size"}."""
    found: list[dict[str, object]] = []
    for page in aws.client("s3").get_paginator("list_object_versions").paginate(Bucket=bucket):
        for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
            found.append(
                {"Key": item["Key"], "VersionId": item["VersionId"], "Size": item.get("Size", 0)}
            )
    return found


def run_of(key: str) -> str:
    parts = key.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else key


def plan(aws: Aws, storage_name: str) -> StoragePlan:
    storage = load_stack(aws, storage_name)
    planned = StoragePlan(storage, storage.output("ArtifactsBucket"), storage.output("LogGroup"))
    runs: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    try:
        for item in versions(aws, planned.bucket):
            counted = runs[run_of(str(item["Key"]))]
            counted[0] += 1
            counted[1] += int(item["Size"] or 0)
    except ClientError as error:
        if error_code(error) != "NoSuchBucket":
            raise
    planned.runs = {run: (objects, size) for run, (objects, size) in runs.items()}
    groups = aws.client("logs").describe_log_groups(logGroupNamePrefix=planned.log_group)
    for group in groups.get("logGroups", []):
        if group["logGroupName"] == planned.log_group:
            planned.log_bytes = int(group.get("storedBytes", 0))
    return planned


def delete(aws: Aws, planned: StoragePlan, echo: Callable[[str], None]) -> None:
    """The stack first (nothing is lost if CloudFormation refuses), then what it retained."""
    cloudformation = aws.client("cloudformation")
    cloudformation.delete_stack(StackName=planned.storage.name)
    cloudformation.get_waiter("stack_delete_complete").wait(
        StackName=planned.storage.name, WaiterConfig={"Delay": 5, "MaxAttempts": 120}
    )
    echo(f"deleted stack {planned.storage.name}")
    s3 = aws.client("s3")
    try:
        every = versions(aws, planned.bucket)
        for start in range(0, len(every), DELETE_BATCH):
            batch = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in every[start : start + DELETE_BATCH]
            ]
            s3.delete_objects(Bucket=planned.bucket, Delete={"Objects": batch, "Quiet": True})
        s3.delete_bucket(Bucket=planned.bucket)
        echo(f"deleted s3://{planned.bucket} ({len(every)} object version(s))")
    except ClientError as error:
        if error_code(error) != "NoSuchBucket":
            raise
    try:
        aws.client("logs").delete_log_group(logGroupName=planned.log_group)
        echo(f"deleted log group {planned.log_group}")
    except ClientError as error:
        if error_code(error) != "ResourceNotFoundException":
            raise


def run_destroy_storage(
    aws: Aws,
    storage_name: str,
    echo: Callable[[str], None],
    confirm: Callable[[str], bool] | None,
) -> int:
    """confirm: asks the user (None: --yes). Declined, nothing is deleted and the status is 1."""
    using = users(aws, storage_name)
    if using:
        raise ConsoleError(
            f"storage stack {storage_name} is used by cluster stack(s) {', '.join(using)}: "
            "destroy them first (make destroy), then run this again"
        )
    planned = plan(aws, storage_name)
    for line in planned.describe():
        echo(line)
    if confirm is not None and not confirm(
        f"delete {storage_name}, its {len(planned.runs)} run(s) and its logs, for good?"
    ):
        echo("nothing deleted")
        return 1
    delete(aws, planned, echo)
    return 0


def storage_bucket(aws: Aws, storage_name: str) -> str:
    """The bucket of the storage stack: where the runs of clusters that are gone still are."""
    return load_stack(aws, storage_name).output("ArtifactsBucket")
