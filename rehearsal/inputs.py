"""The rehearsal's run inputs (--inputs): a data channel in the emulated S3, a variable, and a
secret in the emulated Parameter Store. After the training: the script trained on the channel
and read both; every node holds the same files on its own disk; the agent's data step at a
second start copies nothing, and after a change in S3 only the changed object; and the
secret's value is nowhere: no file of the rehearsal (logs, templates, payload, run), no log
event, no parameter but its own, no object, no line of `make status` or `make logs`."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rehearsal.boots import IMDS_PORT
from rehearsal.emulated_aws import CREDENTIAL_ENV, EmulatedAws, EmulatedInstance
from rehearsal.namespaces import EmulatedNetwork
from rehearsal.report import RehearsalError, log
from userdata.masking import MASK

CHANNEL = "train"
VARIABLE, NOTE = "REHEARSAL_NOTE", "a variable's value, with a comma"
SECRET_VARIABLE = "HF_TOKEN"
# The data: two torch files of a learnable rule, in name order (the example reads a folder).
PARTS = (("part-0.pt", 1536), ("sub/part-1.pt", 512))
FEATURES = 32


@dataclass
class RehearsalInputs:
    bucket: str
    prefix: str
    files: dict[str, bytes]  # below the prefix
    secret_name: str
    secret: str
    local_copy: Path  # the same files, for the local cluster's --data

    @classmethod
    def create(cls, aws: EmulatedAws, folder: Path, run_id: str) -> RehearsalInputs:
        generator = torch.Generator().manual_seed(7)
        local = folder / "data-channel"
        files = {}
        for name, count in PARTS:
            x = torch.randn(count, FEATURES, generator=generator)
            path = local / name
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"x": x, "y": (x[:, :10].argmax(dim=1))}, path)
            files[name] = path.read_bytes()
        made = cls(
            bucket=f"rehearsal-data-{run_id[:8]}",
            prefix="datasets/toy/",
            files=files,
            secret_name=f"/rehearsal/{run_id[:8]}/hf-token",
            secret=f"hf_rehearsal_{secrets.token_hex(16)}",
            local_copy=local,
        )
        s3, ssm = aws.client("s3"), aws.client("ssm")
        s3.create_bucket(Bucket=made.bucket)
        for name, body in files.items():
            s3.put_object(Bucket=made.bucket, Key=made.prefix + name, Body=body)
        ssm.put_parameter(Name=made.secret_name, Value=made.secret, Type="SecureString")
        log(
            f"inputs: {len(files)} file(s) in s3://{made.bucket}/{made.prefix}, "
            f"{VARIABLE}, and {SECRET_VARIABLE} in the SecureString {made.secret_name}"
        )
        return made

    @property
    def settings(self) -> dict[str, str]:
        return {
            "data": f"{CHANNEL}=s3://{self.bucket}/{self.prefix}",
            "env": f"{VARIABLE}={NOTE}",
            "secrets": f"{SECRET_VARIABLE}={self.secret_name}",
        }

    @property
    def local_args(self) -> list[str]:
        """The local cluster's run of the same: the same files as its data."""
        return ["--data", str(self.local_copy)]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_script_read_them(inputs: RehearsalInputs, summary: dict[str, Any]) -> None:
    samples = sum(count for _, count in PARTS)
    if summary.get("samples") != samples or not str(summary.get("data")).endswith(
        f"/data/{CHANNEL}"
    ):
        raise RehearsalError(
            f"the script did not train on the channel: data {summary.get('data')}, "
            f"{summary.get('samples')} samples, not {samples}"
        )
    expected = {VARIABLE: sha256(NOTE.encode()), SECRET_VARIABLE: sha256(inputs.secret.encode())}
    if summary.get("env_sha256") != expected:
        raise RehearsalError(f"the script did not read env and the secret: {summary}")


def check_every_node_holds_the_files(
    inputs: RehearsalInputs, folder: Path, nodes: list[EmulatedInstance]
) -> None:
    for node in nodes:
        copy = folder / f"node-{node.rank}" / "fabric" / "data" / CHANNEL
        found = {
            path.relative_to(copy).as_posix(): sha256(path.read_bytes())
            for path in copy.rglob("*")
            if path.is_file()
        }
        if found != {name: sha256(body) for name, body in inputs.files.items()}:
            raise RehearsalError(f"node {node.rank}'s copy of channel {CHANNEL} is {found}")


def data_step(
    aws: EmulatedAws, network: EmulatedNetwork, folder: Path, node: EmulatedInstance
) -> dict[str, Any]:
    """The agent's data step as it runs at a start of the agent, in the node's namespace on
    its own disk, through its forwarder to the emulated AWS."""
    home = folder / f"node-{node.rank}" / "fabric"
    result = subprocess.run(
        [
            *network.exec_prefix(node.rank), sys.executable, "-m", "userdata.data_channels",
            "--inputs", str(home / "payload" / "inputs.json"), "--data-dir", str(home / "data"),
        ],
        cwd=home / "payload",
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            **CREDENTIAL_ENV,
            "AWS_DEFAULT_REGION": aws.region,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{aws.port}",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{IMDS_PORT}",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RehearsalError(f"node {node.rank}'s data step: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_a_second_start_copies_nothing(
    inputs: RehearsalInputs,
    aws: EmulatedAws,
    network: EmulatedNetwork,
    folder: Path,
    nodes: list[EmulatedInstance],
) -> str:
    for node in nodes:
        again = data_step(aws, network, folder, node)
        if again["files_copied"] != 0:
            raise RehearsalError(f"node {node.rank} copied again at a second start: {again}")
    name, body = PARTS[0][0], b"changed in S3 after the run"
    aws.client("s3").put_object(Bucket=inputs.bucket, Key=inputs.prefix + name, Body=body)
    changed = data_step(aws, network, folder, nodes[-1])
    copy = folder / f"node-{nodes[-1].rank}" / "fabric" / "data" / CHANNEL / name
    if changed["files_copied"] != 1 or copy.read_bytes() != body:
        raise RehearsalError(f"after a change in S3, node {nodes[-1].rank} copied {changed}")
    return (
        f"a second start copied 0 of {again['files']} file(s) on every node; after a change "
        f"in S3, 1 ({changed['copied']} bytes)"
    )


def files_holding(root: Path, value: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and value in path.read_bytes():
                found.append(str(path.relative_to(root)))
        except OSError:
            continue
    return found


def check_the_secret_shows_nowhere(
    inputs: RehearsalInputs,
    aws: EmulatedAws,
    work: Path,
    log_group: str,
    console_output: str,
) -> str:
    value = inputs.secret.encode()
    places = [f"file {name}" for name in files_holding(work, value)]
    logs = aws.client("logs")
    events = [
        event["message"]
        for page in logs.get_paginator("filter_log_events").paginate(logGroupName=log_group)
        for event in page["events"]
    ]
    places += [f"log event {e[:80]!r}" for e in events if inputs.secret in e]
    ssm = aws.client("ssm")
    for page in ssm.get_paginator("describe_parameters").paginate():
        for parameter in page["Parameters"]:
            if parameter["Name"] == inputs.secret_name:
                continue
            history = ssm.get_parameter_history(Name=parameter["Name"])["Parameters"]
            if any(inputs.secret in version["Value"] for version in history):
                places.append(f"parameter {parameter['Name']}")
    s3 = aws.client("s3")
    for bucket in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
                if value in body:
                    places.append(f"object s3://{bucket['Name']}/{item['Key']}")
    cloudformation = aws.client("cloudformation")
    for stack in cloudformation.list_stacks()["StackSummaries"]:
        template = cloudformation.get_template(StackName=stack["StackId"])["TemplateBody"]
        if inputs.secret in json.dumps(template):
            places.append(f"template of {stack['StackName']}")
    if inputs.secret in console_output:
        places.append("make status or make logs")
    if places:
        raise RehearsalError(f"the secret's value shows in: {', '.join(places)}")
    masked = f"env {SECRET_VARIABLE}={MASK}"
    if not any(masked in event for event in events):
        raise RehearsalError(f"no {masked!r} in the shipped logs: the script printed it")
    return (
        f"the secret's value is in no file, log event ({len(events)}), parameter, object, "
        f"template or console line; the script's print of it reads {masked!r}"
    )


def check_inputs(
    inputs: RehearsalInputs,
    aws: EmulatedAws,
    network: EmulatedNetwork,
    deployment_folder: Path,
    work: Path,
    nodes: list[EmulatedInstance],
    summary: dict[str, Any],
    log_group: str,
    console_output: str,
) -> None:
    check_script_read_them(inputs, summary)
    check_every_node_holds_the_files(inputs, deployment_folder, nodes)
    log(
        f"the script trained on channel {CHANNEL} ({summary['samples']} samples) and read "
        f"{VARIABLE} and {SECRET_VARIABLE}; every node holds the same {len(inputs.files)} "
        "file(s) on its own disk"
    )
    log(check_a_second_start_copies_nothing(inputs, aws, network, deployment_folder, nodes))
    log(check_the_secret_shows_nowhere(inputs, aws, work, log_group, console_output))
