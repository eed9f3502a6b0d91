"""The console (`python -m console`) against a deployed stack emulated in moto: a stack whose
outputs name real (emulated) instances, the nodes' phase parameters, a versioned artifacts
bucket and a log group; plus its pure formatting and decisions."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

import boto3
import botocore.session
import pytest
from boto3.exceptions import RetriesExceededError, S3TransferFailedError
from boto3.s3.transfer import S3Transfer
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from botocore.retries.bucket import TokenBucket
from botocore.retries.standard import ExponentialBackoff
from click.testing import CliRunner

import console.__main__ as console_main
import console.results as console_results
from console import format_duration, format_table
from console.__main__ import cli
from console.aws import Aws, S3Object, Stack, connect, load_stack
from console.logs import LogEvent, format_event, merge, parse_since, run_logs
from console.results import is_temporary
from console.status import (
    NodeRow,
    Progress,
    Snapshot,
    StepHistory,
    eta_seconds,
    format_status,
    judge,
    watch,
)
from rehearsal.throttling import Throttle, ThrottledMotoServer, every
from tests.conftest import REGION, moto_client

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ami-12c6146b"
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


@dataclass
class World:
    """One deployed stack as the console sees it."""

    url: str
    stack: str
    bucket: str
    run: str
    group: str
    instance_ids: list[str]
    storage: str

    def client(self, service: str):
        return moto_client(self.url, service)

    def put(self, name: str, body: bytes | str | dict, run: str | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        data = data.encode() if isinstance(data, str) else data
        key = f"{self.stack}/{run or self.run}/{name}"
        self.client("s3").put_object(Bucket=self.bucket, Key=key, Body=data)

    def log(self, rank: int, events: list[tuple[int, str]]) -> None:
        logs = self.client("logs")
        stream = f"{self.stack}/node-{rank}"  # the storage stack's group is shared
        if not logs.describe_log_streams(logGroupName=self.group, logStreamNamePrefix=stream)[
            "logStreams"
        ]:
            logs.create_log_stream(logGroupName=self.group, logStreamName=stream)
        logs.put_log_events(
            logGroupName=self.group,
            logStreamName=stream,
            logEvents=[{"timestamp": stamp, "message": text} for stamp, text in events],
        )


def deploy(
    url: str,
    phases: list[str | None],
    run: str = "run-a",
    log_group: bool = True,
    fingerprint: str = "",
) -> World:
    """What `make deploy` leaves behind, with literal outputs (moto runs no real nodes)."""
    suffix = uuid.uuid4().hex[:10]
    stack, bucket = f"Fabric{suffix}", f"fabric-artifacts-{suffix}"
    group = f"/fabric/{stack}/nodes"
    reservation = moto_client(url, "ec2").run_instances(
        ImageId=IMAGE, MinCount=len(phases), MaxCount=len(phases)
    )
    ids = [instance["InstanceId"] for instance in reservation["Instances"]]
    s3 = moto_client(url, "s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    if log_group:
        moto_client(url, "logs").create_log_group(logGroupName=group)
    # As make deploy leaves it: the bucket and the log group are the storage stack's outputs,
    # the cluster stack names its storage stack.
    storage = f"FabricStorage{suffix}"
    storage_template = {
        "Resources": {
            "Marker": {
                "Type": "AWS::SSM::Parameter",
                "Properties": {"Name": f"/{storage}/marker", "Type": "String", "Value": "x"},
            }
        },
        "Outputs": {
            "ArtifactsBucket": {"Value": bucket},
            "LogGroup": {"Value": group},
        },
    }
    moto_client(url, "cloudformation").create_stack(
        StackName=storage, TemplateBody=json.dumps(storage_template)
    )
    outputs = {"StorageStack": storage, "RunName": run}
    if fingerprint:
        outputs["RunFingerprint"] = fingerprint
    outputs |= {f"Node{rank}InstanceId": instance_id for rank, instance_id in enumerate(ids)}
    template = {
        "Resources": {
            "MainAddress": {
                "Type": "AWS::SSM::Parameter",
                "Properties": {
                    "Name": f"/fabric/{stack}/main-address",
                    "Type": "String",
                    "Value": "10.0.0.10",
                },
            }
        },
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    moto_client(url, "cloudformation").create_stack(
        StackName=stack, TemplateBody=json.dumps(template)
    )
    ssm = moto_client(url, "ssm")
    for rank, phase in enumerate(phases):
        if phase is not None:
            ssm.put_parameter(Name=f"/fabric/{stack}/node-{rank}/phase", Value=phase, Type="String")
    return World(url, stack, bucket, run, group, ids, storage)


@pytest.fixture(scope="module", autouse=True)
def _models_read_once() -> Iterator[None]:
    """Every in-process command makes its own boto3 session, which would read the service
    models from disk again (about 0.4 s a command); here they share one loader."""
    original = botocore.session.create_loader
    loaders: dict[str | None, tuple[object, int]] = {}

    def shared(search_path_string: str | None = None):
        if search_path_string not in loaders:
            loader = original(search_path_string)
            loaders[search_path_string] = (loader, len(loader.search_paths))
        loader, paths = loaders[search_path_string]
        del loader.search_paths[paths:]  # boto3 appends its own folder for each session
        return loader

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", shared)
        yield


@pytest.fixture
def endpoint(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """In-process commands reach moto through the same variable a user's shell would set."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    return moto_url


def console(*args: str):
    result = CliRunner().invoke(cli, list(args), prog_name="python -m console")
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def value_of(output: str, label: str) -> str:
    """The value in the run section's `  label  value` line."""
    match = re.search(rf"^  {re.escape(label)}\s+(.*)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


# --- status --------------------------------------------------------------------------------


def test_status_of_a_finished_run(endpoint: str) -> None:
    world = deploy(endpoint, ["done", "done: run run-a already complete (fabric-run.json)"])
    world.put("summary.json", {"steps": 200, "final_loss": 1.2345, "train_time_s": 75.0})
    world.put("progress.json", {"step": 200, "total_steps": 200, "loss": 1.25})
    world.put("fabric-run.json", {"run": "run-a", "status": "complete"})

    result = console("status", "--stack", world.stack)

    assert result.exit_code == 0, result.output
    out = result.stdout
    lines = out.splitlines()
    for rank, instance_id in enumerate(world.instance_ids):
        row = next(line for line in lines if instance_id in line)
        assert row.split()[:3] == [str(rank), instance_id, "running"]
        assert "done" in row
    assert value_of(out, "step") == "200 / 200 (100%)"
    assert value_of(out, "loss") == "1.2345"  # the summary's final loss wins
    assert value_of(out, "elapsed") == "1m15s"
    assert value_of(out, "ETA") == "-"
    assert lines[-1].startswith("run run-a: complete — results in ")
    assert f"s3://{world.bucket}/{world.stack}/run-a/" in lines[-1]
    assert result.stderr == ""


def test_a_complete_run_named_again_with_other_training_is_in_progress(endpoint: str) -> None:
    """-c run=run-a with one more epoch: the marker of the first training is not this one's."""
    world = deploy(endpoint, ["training", "training"], fingerprint="b" * 64)
    world.put("fabric-run.json", {"run": "run-a", "status": "complete", "fingerprint": "a" * 64})
    result = console("status", "--stack", world.stack)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("run run-a: in progress")


def test_status_of_a_failed_node(endpoint: str) -> None:
    reason = "fabric run exited with 1: CUDA out of memory"
    world = deploy(endpoint, ["training", f"failed: {reason}"])

    result = console("status", "--stack", world.stack, "--region", REGION)

    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1] == f"run run-a: FAILED — node 1: {reason}"
    assert value_of(result.stdout, "progress") == (
        "no progress.json (the script does not write one)"
    )
    assert value_of(result.stdout, "ETA") == "-"


def test_status_in_progress_shows_progress_and_an_eta(endpoint: str) -> None:
    """Two versions of progress.json in the versioned bucket give a step rate at one look."""
    world = deploy(endpoint, ["training", "training (restart 1)"])
    now = datetime.now(UTC)
    world.put(
        "progress.json",
        {
            "step": 100,
            "total_steps": 1000,
            "loss": 3.1,
            "updated": iso(now - timedelta(seconds=65)),
        },
    )
    world.put(
        "progress.json",
        {
            "step": 200,
            "total_steps": 1000,
            "loss": 2.5,
            "samples_per_s": 512.0,
            "updated": iso(now - timedelta(seconds=5)),
        },
    )

    result = console("status", "--stack", world.stack)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert value_of(out, "step") == "200 / 1000 (20%)"
    assert value_of(out, "loss") == "2.5000"
    assert value_of(out, "samples/s") == "512.0"
    assert value_of(out, "ETA") == "8m00s"  # 800 steps left at 100 steps a minute
    assert re.fullmatch(r"updated \d+s ago", value_of(out, "progress"))
    assert re.fullmatch(r"\d+s", value_of(out, "elapsed"))  # since the nodes began training
    assert "training (restart 1)" in out
    assert out.splitlines()[-1] == "run run-a: in progress"


def test_status_shows_a_nodes_data_copy_while_it_copies(endpoint: str) -> None:
    world = deploy(endpoint, ["data: 3.2 of 10.0 GB", "waiting-for-main"])

    result = console("status", "--stack", world.stack)

    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if line.lstrip().startswith("0 ")]
    assert "data: 3.2 of 10.0 GB" in row
    assert result.stdout.splitlines()[-1] == "run run-a: in progress"


def test_status_watch_ends_with_the_verdict(endpoint: str) -> None:
    world = deploy(endpoint, ["done", "done"])
    result = console("status", "--stack", world.stack, "--watch", "--interval", "1")
    assert result.exit_code == 0
    assert "\x1b[" not in result.stdout  # no screen clearing when stdout is not a terminal
    assert result.stdout.splitlines()[-1].startswith("run run-a: complete")


def snapshot(phases: list[str], step: int) -> Snapshot:
    nodes = [NodeRow(rank, f"i-{rank}", "running", phase, NOW) for rank, phase in enumerate(phases)]
    progress = Progress(step, 10, 1.0, 100.0, NOW)
    return Snapshot("S", REGION, "b", "r", nodes, progress, None, False, None, NOW)


def test_watch_redraws_until_decided_and_ctrl_c_is_130() -> None:
    looks = iter([snapshot(["training"] * 2, 5), snapshot(["training"] * 2, 8)])
    final = snapshot(["done", "failed: node lost"], 8)
    shown: list[str] = []
    sleeps: list[float] = []
    code = watch(lambda: next(looks, final), 7, shown.append, sleeps.append, clear=True)
    assert code == 1
    assert sleeps == [7, 7]
    assert all(text.startswith("\x1b[H\x1b[2J") for text in shown)
    assert "(every 7s; Ctrl-C to stop)" in shown[0]
    assert shown[-1].endswith("run r: FAILED — node 1: node lost")

    def interrupted() -> Snapshot:
        raise KeyboardInterrupt

    assert watch(interrupted, 1, shown.append, sleeps.append) == 130


def test_verdicts_and_eta() -> None:
    def nodes(*phases: str | None, state: str = "running") -> list[NodeRow]:
        return [NodeRow(rank, "i", state, phase, None) for rank, phase in enumerate(phases)]

    assert judge(nodes("done", "done: run r already complete (x)"), False).state == "complete"
    assert judge(nodes("training", "waiting-for-main"), True).state == "complete"  # marker
    failed = judge(nodes("done", "failed: install: no torch"), True)
    assert (failed.state, failed.rank, failed.reason, failed.exit_code) == (
        "failed",
        1,
        "install: no torch",
        1,
    )
    assert judge(nodes("booting", None), False).state == "in progress"
    stopped = judge(nodes("interrupted: spot", "training", state="stopped"), False)
    assert (stopped.state, stopped.exit_code) == ("stopped", 1)

    # samples/s alone gives an ETA only when the script says how many samples make a step
    assert eta_seconds(Progress(100, 300, None, 64.0, NOW), None) is None
    assert eta_seconds(Progress(100, 300, None, 64.0, NOW, samples_per_step=32), None) == 100
    history = StepHistory()
    history.add(Progress(50, 300, None, None, NOW))
    history.add(Progress(80, 300, None, None, NOW + timedelta(seconds=30)))
    assert history.rate() == 1.0
    history.add(Progress(10, 300, None, None, NOW + timedelta(seconds=60)))  # resumed earlier
    assert history.rate() is None
    text = format_status(snapshot(["training", "training"], 5))
    assert "5 / 10 (50%)" in text and text.endswith("run r: in progress")


def test_formatting() -> None:
    assert [format_duration(s) for s in (None, -3, 0, 45, 192, 7500, 97200)] == [
        "-",
        "0s",
        "0s",
        "45s",
        "3m12s",
        "2h05m",
        "1d03h",
    ]
    assert format_table(["a", "bb"], [["xyz", "1"], ["", "22"]]).splitlines() == [
        "a    bb",
        "xyz  1",
        "     22",
    ]
    assert parse_since("1h30m") == timedelta(minutes=90)
    assert parse_since("all") is None
    assert [is_temporary(k) for k in ("a/x.ckpt.tmp", "b.partial", "c.unreadable", "d.ckpt")] == [
        True,
        True,
        True,
        False,
    ]
    event = LogEvent(3, 1, "e", "two\nlines\n")
    assert format_event(event) == "[node 3] two\n[node 3] lines"
    stable = merge([LogEvent(1, 5, "a", "x"), LogEvent(0, 5, "b", "y"), LogEvent(0, 1, "c", "z")])
    assert [e.event_id for e in stable] == ["c", "a", "b"]


# --- logs ----------------------------------------------------------------------------------


def test_logs_merge_every_node_in_time_order(endpoint: str) -> None:
    world = deploy(endpoint, ["training", "training", "booting"])
    start = int(time.time() * 1000) - 60_000
    world.log(0, [(start, "boot 0"), (start + 2000, "step 10: loss 2.1"), (start + 4000, "end 0")])
    world.log(1, [(start + 1000, "boot 1"), (start + 3000, "step 10 on node 1")])
    # node 2 has logged nothing yet: no stream, nothing printed for it

    every = console("logs", "--stack", world.stack)
    assert every.exit_code == 0, every.output
    assert every.stdout.splitlines() == [
        "[node 0] boot 0",
        "[node 1] boot 1",
        "[node 0] step 10: loss 2.1",
        "[node 1] step 10 on node 1",
        "[node 0] end 0",
    ]

    one = console("logs", "--stack", world.stack, "--node", "1", "--since", "10m")
    assert one.stdout.splitlines() == ["[node 1] boot 1", "[node 1] step 10 on node 1"]

    silent = console("logs", "--stack", world.stack, "--node", "2")
    assert silent.exit_code == 2
    assert silent.stderr.startswith(f"error: no log stream {world.stack}/node-2 in ")
    absent = console("logs", "--stack", world.stack, "--node", "7")
    assert absent.stderr == f"error: no node 7 in stack {world.stack} (nodes 0..2)\n"
    old = console("logs", "--stack", world.stack, "--since", "10s")
    assert old.exit_code == 0 and old.stdout == ""


def test_logs_follow_prints_new_lines_once(endpoint: str) -> None:
    world = deploy(endpoint, ["training"])
    start = int(time.time() * 1000) - 10_000
    world.log(0, [(start, "first")])
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:
            world.log(0, [(start + 5000, "second")])
        elif len(polls) == 3:
            raise KeyboardInterrupt

    aws = connect(None)
    lines: list[str] = []
    code = run_logs(aws, load_stack(aws, world.stack), None, True, None, lines.append, sleep)
    assert code == 0
    assert lines == ["[node 0] first", "[node 0] second"]


def test_logs_of_a_missing_log_group(endpoint: str) -> None:
    world = deploy(endpoint, ["booting"], log_group=False)
    result = console("logs", "--stack", world.stack)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: no log group {world.group} in region {REGION}")
    assert result.stderr.count("\n") == 1


# --- results and runs ----------------------------------------------------------------------


def test_results_download_the_run(endpoint: str, tmp_path: Path) -> None:
    world = deploy(endpoint, ["done", "done"])
    summary = {"steps": 200, "final_loss": 1.2345, "plot": "/opt/fabric/runs/run-a/loss.png"}
    world.put("summary.json", json.dumps(summary, indent=2))
    world.put("loss.png", b"\x89PNG fake")
    world.put("metrics.csv", "step,loss\n1,3.0\n")
    world.put("checkpoints/step-00000100.ckpt", b"100")
    world.put("checkpoints/step-00000200.ckpt", b"200")
    world.put("checkpoints/step-00000300.ckpt.tmp", b"torn")
    world.put("fabric-run.json", {"run": "run-a", "status": "complete"})

    result = console("results", "--stack", world.stack, "--dest", str(tmp_path))

    assert result.exit_code == 0, result.output
    run_dir = tmp_path / world.stack / "run-a"
    body = world.client("s3").get_object(
        Bucket=world.bucket, Key=f"{world.stack}/run-a/summary.json"
    )["Body"]
    assert (run_dir / "summary.json").read_bytes() == body.read()
    assert not (run_dir / "checkpoints" / "step-00000300.ckpt.tmp").exists()
    small = ["fabric-run.json", "loss.png", "metrics.csv", "summary.json"]
    assert files_in(run_dir) == ["checkpoints/step-00000200.ckpt", *small]  # the newest only
    out = result.stdout
    assert out.splitlines()[1] == (  # before downloading: S3 bills each GB
        "5 file(s) to download, 153 B; 1 older checkpoint(s), 3 B, not downloaded "
        "(--all downloads them)"
    )
    assert (
        "5 file(s) downloaded, 0 already here, 1 temporary skipped, "
        "1 older checkpoint(s) not downloaded (--all)"
    ) in out
    assert '"final_loss": 1.2345' in out
    assert f"summary     {run_dir / 'summary.json'}" in out
    assert f"plot        {run_dir / 'loss.png'}" in out
    assert f"checkpoint  {run_dir / 'checkpoints' / 'step-00000200.ckpt'}" in out

    every = console("results", "--stack", world.stack, "--dest", str(tmp_path), "--all")
    assert every.stdout.splitlines()[1] == "1 file(s) to download, 3 B (5 already here)"
    assert "1 file(s) downloaded, 5 already here, 1 temporary skipped\n" in every.stdout
    assert files_in(run_dir) == [
        "checkpoints/step-00000100.ckpt",
        "checkpoints/step-00000200.ckpt",
        *small,
    ]
    assert f"checkpoint  {run_dir / 'checkpoints' / 'step-00000200.ckpt'}" in every.stdout


def test_results_bring_back_what_the_script_wrote_beside_itself(
    endpoint: str, tmp_path: Path
) -> None:
    """outputs/: what node 0's script wrote by relative path (lightning_logs/, a TensorBoard
    logs/), kept by the agent under the run's prefix, comes back with the run."""
    world = deploy(endpoint, ["done", "done"])
    world.put("summary.json", {"steps": 1})
    world.put("outputs/lightning_logs/version_0/events.out", b"tensorboard")
    world.put("fabric-args.json", {"script_args": ["--epochs", "2"]})
    result = console("results", "--stack", world.stack, "--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path / world.stack / "run-a") == [
        "fabric-args.json",
        "outputs/lightning_logs/version_0/events.out",
        "summary.json",
    ]


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_results_of_an_unfinished_run_of_a_deleted_stack(endpoint: str, tmp_path: Path) -> None:
    world = deploy(endpoint, ["training"])
    world.put("progress.json", {"step": 3}, run="old-run")
    world.client("cloudformation").delete_stack(StackName=world.stack)

    gone = console("results", "--stack", world.stack, "--run", "old-run")
    assert gone.exit_code == 2
    assert gone.stderr.startswith(f"error: no stack {world.stack} in region {REGION}")
    assert "--bucket" in gone.stderr

    result = console(
        "results", "--stack", world.stack, "--run", "old-run", "--bucket", world.bucket,
        "--dest", str(tmp_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no summary.json: the run has not finished, or its script writes none" in result.stdout
    assert (tmp_path / world.stack / "old-run" / "progress.json").exists()


def test_runs_lists_every_run_and_marks_the_current_one(endpoint: str) -> None:
    world = deploy(endpoint, ["training", "training"], run="run-b")
    world.put("summary.json", {"steps": 300, "final_loss": 0.9}, run="run-a")
    world.put("fabric-run.json", {"run": "run-a", "status": "complete"}, run="run-a")
    world.put("progress.json", {"step": 50, "total_steps": 300, "loss": 2.1}, run="run-b")

    result = console("runs", "--stack", world.stack)

    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["run", "status", "last", "step", "final", "loss", "date"]
    rows = {line[3:].split()[0]: line for line in lines[:2]}  # after the mark column
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert rows["run-b"].startswith("*  run-b ")  # the stack's RunName
    assert rows["run-b"].split()[2:6] == ["in", "progress/stopped", "50", "2.1000"]
    assert rows["run-a"].startswith("   run-a ")
    assert rows["run-a"].split()[1:5] == ["complete", "300", "0.9000", today]
    assert lines[2] == f"(* the run stack {world.stack} trains now: run-b)"
    by_bucket = console("runs", "--stack", world.stack, "--bucket", world.bucket)
    assert by_bucket.stdout == result.stdout


# --- one-line errors, from a real process ---------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_errors_are_one_line(aws_env: dict[str, str], moto_url: str, tmp_path: Path) -> None:
    """From real processes: stderr is exactly one `error: ...` line, exit 2, nothing else."""
    world = deploy(moto_url, ["done"])
    (tmp_path / "empty").write_text("")
    bare = {key: value for key, value in aws_env.items() if not key.startswith("AWS_")}
    no_credentials = bare | {
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "empty"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "empty"),
    }
    unreachable = aws_env | {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
        "AWS_MAX_ATTEMPTS": "1",  # the user's own setting is honoured: no retries to wait out
    }
    cases = {
        "no stack": (
            ["status", "--stack", "NoSuchStack"],
            aws_env,
            f"no stack NoSuchStack in region {REGION}: deploy it with make deploy, "
            "or pass --stack/--region",
        ),
        "no credentials": (
            ["status", "--stack", world.stack],
            no_credentials,
            "no AWS credentials: configure them (aws configure) or set AWS_PROFILE",
        ),
        "unreachable": (["runs", "--stack", world.stack], unreachable, "cannot reach http://"),
    }
    # In parallel: each is a Python start-up, and the unreachable one waits out its retries.
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "console", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env, _) in cases.items()
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=60)
        expected = cases[name][2]
        assert process.returncode == 2, (name, stdout, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith(f"error: {expected}"), (name, stderr)
        assert "Traceback" not in stderr and stdout == "", name


def test_more_one_line_errors(endpoint: str, tmp_path: Path) -> None:
    world = deploy(endpoint, ["done"])
    world.put("summary.json", {"steps": 1})
    world.put("summary.json", {"steps": 1}, run="run-0")
    cases = {
        ("results", "--stack", world.stack, "--run", "nope", "--dest", str(tmp_path)): (
            f"no run nope in s3://{world.bucket}/{world.stack}/ (runs: run-0, run-a)"
        ),
        ("logs", "--since", "soon"): "--since 'soon': expected a duration like 30m",
        ("status", "--interval", "0"): "Invalid value for '--interval'",
        ("runs", "--stack", "Gone"): f"no stack Gone in region {REGION}",
    }
    for args, expected in cases.items():
        result = console(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(f"error: {expected}"), (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stdout == "", args


# --- throttling -----------------------------------------------------------------------------


@pytest.fixture
def throttling(endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """Starts a throttling front and points the console at it. botocore's own waits (the
    backoff between attempts, the adaptive rate limiter's) are cut out: what is tested is
    how many attempts are made, and what the user sees."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    monkeypatch.setattr(TokenBucket, "acquire", lambda self, amount=1, block=True: True)
    servers: list[ThrottledMotoServer] = []

    def start(rules: dict[str, tuple[int, int]]) -> Throttle:
        """Of every `period` calls to a service in `rules`, the first `refused` are throttled
        (rules: {service: (refused, period)}), with the service's own throttling answer."""
        server = ThrottledMotoServer("127.0.0.1", 0, every(rules))
        server.start()
        servers.append(server)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.get_host_and_port()[1]}")
        return server.throttle

    yield start
    for server in servers:
        server.stop()


def test_status_survives_throttling(throttling) -> None:
    """Three calls of every four throttled, on every service status calls."""
    world = deploy(os.environ["AWS_ENDPOINT_URL"], ["training", "training"])
    world.put("progress.json", {"step": 5, "total_steps": 10})
    services = ("cloudformation", "ssm", "ec2", "s3")
    front = throttling({service: (3, 4) for service in services})

    result = console("status", "--stack", world.stack)

    assert result.exit_code == 0, result.output
    assert value_of(result.stdout, "step") == "5 / 10 (50%)"
    assert result.stdout.splitlines()[-1] == "run run-a: in progress"
    assert all(front.throttled.get(service, 0) >= 3 for service in services), front.throttled


def test_throttling_that_outlasts_the_retries_is_one_line(throttling) -> None:
    world = deploy(os.environ["AWS_ENDPOINT_URL"], ["training"])
    front = throttling({"ssm": (1, 1)})  # every call

    result = console("status", "--stack", world.stack)

    assert result.exit_code == 2, result.output
    assert front.throttled == {"ssm": 10}
    assert result.stderr == (
        "error: AWS throttled GetParameters (ThrottlingException: Rate exceeded) after 10 "
        "attempt(s): too many calls in this account and region just now; retry in a minute\n"
    )


def test_an_unreachable_endpoint_is_given_up_after_three_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten attempts are for throttling; a network that cannot reach AWS fails in seconds."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    aws = connect(None)
    client = aws.client("cloudformation")
    attempts: list[str] = []
    client.meta.events.register("before-send", lambda **kwargs: attempts.append("sent"))
    result = console("status", "--stack", "Any")  # its own clients
    with pytest.raises(EndpointConnectionError):
        client.describe_stacks(StackName="Any")
    assert len(attempts) == 3
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot reach http://")


# --- phases: whose they are ----------------------------------------------------------------


def phase_value(text: str, instance: str) -> str:
    return json.dumps({"phase": text, "instance": instance})  # userdata/phase.py's contract


def test_status_shows_only_the_phases_of_the_instances_holding_the_ranks(endpoint: str) -> None:
    """A redeploy: old nodes still write the ranks' parameters beside the new ones."""
    world = deploy(endpoint, [None, None, "booting"])
    ssm = world.client("ssm")

    def put(rank: int, value: str) -> None:
        name = f"/fabric/{world.stack}/node-{rank}/phase"
        ssm.put_parameter(Name=name, Value=value, Type="String", Overwrite=True)

    put(0, phase_value("waiting-for-main", world.instance_ids[0]))
    put(0, phase_value("training", world.instance_ids[0]))
    put(0, phase_value("failed: terminated by the redeploy", "i-0old00000000000000"))
    put(1, phase_value("done", "i-0old11111111111111"))

    result = console("status", "--stack", world.stack)

    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if " i-" in line}
    assert rows["0"].split()[1:4] == [world.instance_ids[0], "running", "training"]
    assert "(old instance i-0old00000000000000 wrote: failed: terminated" in rows["0"]
    assert "(no phase yet) (old instance i-0old11111111111111 wrote: done)" in rows["1"]
    assert rows["2"].split()[3] == "booting"  # the stack's initial value has no writer
    assert '"phase"' not in result.stdout
    assert result.stdout.splitlines()[-1] == "run run-a: in progress"  # not FAILED, not done


def test_an_interrupted_node_stops_the_run_and_it_is_never_complete() -> None:
    def nodes(*phases: str) -> list[NodeRow]:
        return [NodeRow(rank, "i", "running", phase, None) for rank, phase in enumerate(phases)]

    notice = "interrupted: spot instance-action {'action': 'terminate'}"
    for marker in (False, True):
        verdict = judge(nodes("training", notice), marker)
        assert (verdict.state, verdict.rank, verdict.exit_code) == ("stopped", 1, 1)
    assert judge(nodes("failed: lost node 0", notice), False).state == "failed"
    text = format_status(snapshot(["done", notice], 10))
    assert text.splitlines()[-1] == (
        f"run r: stopped before completing — node 1: {notice} "
        "(resumable: deploy again to continue from the newest checkpoint)"
    )


# --- results: what to download ---------------------------------------------------------------


def test_results_ask_before_a_large_download(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = deploy(endpoint, ["done"])
    world.put("summary.json", {"steps": 2})
    world.put("checkpoints/step-00000002.ckpt", b"x" * 2000)
    monkeypatch.setattr(console_results, "CONFIRM_ABOVE", 1000)
    args = ["results", "--stack", world.stack, "--dest", str(tmp_path)]
    run_dir = tmp_path / world.stack / "run-a"
    plan = "2 file(s) to download, 2.0 KB"

    piped = CliRunner().invoke(cli, args, input="")  # not a terminal: says the size, goes on
    assert piped.exit_code == 0, piped.output
    assert piped.stdout.splitlines()[1].startswith(plan)
    assert "Download" not in piped.stderr
    shutil.rmtree(run_dir)

    monkeypatch.setattr(console_main, "stdin_is_terminal", lambda: True)
    declined = CliRunner().invoke(cli, args, input="n\n")
    assert declined.exit_code == 1, declined.output
    assert "Download 2.0 KB? [y/N]" in declined.stderr
    assert declined.stdout.splitlines()[1:] == [plan, "nothing downloaded"]
    assert not run_dir.exists()

    accepted = CliRunner().invoke(cli, [*args, "--yes"], input="")
    assert accepted.exit_code == 0, accepted.output
    assert "Download" not in accepted.stderr
    assert (run_dir / "checkpoints" / "step-00000002.ckpt").stat().st_size == 2000


# --- the storage stack: runs outlive clusters; destroy-storage --------------------------------


def test_runs_of_a_destroyed_cluster_are_listed_from_the_storage(endpoint: str) -> None:
    world = deploy(endpoint, ["done", "done"])
    world.put("summary.json", {"steps": 9})
    world.client("cloudformation").delete_stack(StackName=world.stack)  # make destroy
    listed = console("runs", "--stack", world.stack, "--storage", world.storage)
    assert listed.exit_code == 0, listed.output
    assert "run-a" in listed.stdout and "complete" not in listed.stdout.split("run-a")[0]


def test_destroy_storage_says_what_it_deletes_asks_and_refuses_while_a_cluster_uses_it(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = deploy(endpoint, ["done", "done"])
    world.put("checkpoints/step-00000002.ckpt", b"x" * 2048)
    world.put("summary.json", {"steps": 2}, run="run-b")
    world.log(0, [(int(time.time() * 1000), "boot")])
    args = ["destroy-storage", "--storage", world.storage]

    used = console(*args, "--yes")
    assert used.exit_code == 2
    assert used.stderr == (
        f"error: storage stack {world.storage} is used by cluster stack(s) {world.stack}: "
        "destroy them first (make destroy), then run this again\n"
    )
    world.client("cloudformation").delete_stack(StackName=world.stack)  # make destroy

    piped = CliRunner().invoke(cli, args, input="")  # no terminal to ask, no --yes: nothing
    assert piped.exit_code == 2 and "pass --yes" in piped.stderr
    monkeypatch.setattr(console_main, "stdin_is_terminal", lambda: True)
    declined = CliRunner().invoke(cli, args, input="n\n")
    assert declined.exit_code == 1, declined.output
    assert declined.stdout.splitlines() == [
        f"storage stack {world.storage} (us-east-1):",
        f"  bucket s3://{world.bucket}: 2 run(s), 2.0 KB (every version)",
        f"    {world.stack}/run-a: 1 object version(s), 2.0 KB",
        f"    {world.stack}/run-b: 1 object version(s), 12 B",
        f"  log group {world.group}: 4 B stored",
        "nothing deleted",
    ]
    assert world.client("s3").head_bucket(Bucket=world.bucket)  # all still there

    accepted = CliRunner().invoke(cli, args, input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert accepted.stdout.splitlines()[-3:] == [
        f"deleted stack {world.storage}",
        f"deleted s3://{world.bucket} (2 object version(s))",
        f"deleted log group {world.group}",
    ]
    names = [b["Name"] for b in world.client("s3").list_buckets()["Buckets"]]
    assert world.bucket not in names
    groups = world.client("logs").describe_log_groups(logGroupNamePrefix=world.group)
    assert groups["logGroups"] == []


def test_checkpoints_are_files_or_folders_of_shards() -> None:
    from console.results import checkpoint_of, select  # new: the old code fails here

    paths = {
        "checkpoints/step-00000100.ckpt": "checkpoints/step-00000100.ckpt",
        "step-00000100.ckpt": "step-00000100.ckpt",
        "checkpoints/step-00000200.ckpt/__0_0.distcp": "checkpoints/step-00000200.ckpt",
        "out/checkpoints/last.pt": "out/checkpoints/last.pt",
        "checkpoints/best.pth": "checkpoints/best.pth",
        "model.pt": None,  # a result, not under checkpoints/
        "metrics.csv": None,
        "checkpoints/notes.txt": None,
    }
    for path, expected in paths.items():
        assert checkpoint_of(PurePosixPath(path)) == expected, path

    def item(key: str, minute: int) -> S3Object:
        return S3Object(f"S/r/{key}", 10, NOW + timedelta(minutes=minute))

    objects = [
        item("checkpoints/step-00000100.ckpt", 1),
        item("checkpoints/step-00000200.ckpt/__0_0.distcp", 2),
        item("checkpoints/step-00000200.ckpt/.metadata", 3),
        item("checkpoints/step-00000300.ckpt.tmp", 4),
        item("summary.json", 3),
    ]
    chosen = select(objects, "S/r/", everything=False)
    assert chosen.newest == "checkpoints/step-00000200.ckpt"
    assert [o.key.removeprefix("S/r/") for o in chosen.wanted] == [
        "summary.json",
        "checkpoints/step-00000200.ckpt/__0_0.distcp",
        "checkpoints/step-00000200.ckpt/.metadata",
    ]
    assert (chosen.older_checkpoints, chosen.temporary) == (
        1,
        ["S/r/checkpoints/step-00000300.ckpt.tmp"],
    )
    assert len(select(objects, "S/r/", everything=True).wanted) == 4


def test_a_failed_download_is_one_line(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = deploy(endpoint, ["done"])
    world.put("summary.json", {"steps": 1})
    failures = {
        "Max Retries Exceeded (Read timeout on endpoint URL": RetriesExceededError(
            ReadTimeoutError(endpoint_url="https://s3.amazonaws.com/x")
        ),
        "S3 transfer failed: gone": S3TransferFailedError("gone"),
        "No space left on device": OSError(errno.ENOSPC, "No space left on device"),
    }
    for expected, failure in failures.items():

        def broken(*args: object, failure: Exception = failure, **kwargs: object) -> None:
            Path(args[3] if len(args) > 3 else kwargs["filename"]).write_bytes(b"half")
            raise failure

        monkeypatch.setattr(S3Transfer, "download_file", broken)
        result = console("results", "--stack", world.stack, "--dest", str(tmp_path))
        assert result.exit_code == 2, (expected, result.output)
        assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
        assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # no half file


# --- logs: streaming, late events, throttling ------------------------------------------------


class FakeLogs:
    """FilterLogEvents page by page (nextToken is the page's index), and a record of what had
    been printed when each page was asked for."""

    def __init__(self, pages: list[list[tuple[int, str]]], printed: list[str]) -> None:
        self.pages, self.printed = pages, printed
        self.asked: list[list[str]] = []
        self.failures: list[Exception] = []

    def filter_log_events(self, **arguments: object) -> dict:
        if self.failures:
            raise self.failures.pop(0)
        index = int(str(arguments.get("nextToken", 0)))
        self.asked.append(list(self.printed))
        events = [
            {"logStreamName": "node-0", "timestamp": stamp, "eventId": f"{stamp}", "message": text}
            for stamp, text in self.pages[index]
        ]
        answer: dict = {"events": events}
        if index + 1 < len(self.pages):
            answer["nextToken"] = str(index + 1)
        return answer

    def get_paginator(self, name: str):
        fake = self

        class Paginator:
            def paginate(self, **arguments: object):
                if name == "describe_log_streams":
                    yield {"logStreams": [{"logStreamName": "S/node-0"}]}
                    return
                token = None
                while True:
                    page = fake.filter_log_events(
                        **arguments, **({"nextToken": token} if token else {})
                    )
                    yield page
                    token = page.get("nextToken")
                    if not token:
                        return

        return Paginator()


def fake_stack() -> tuple[Aws, Stack]:
    aws = Aws(boto3.Session(region_name=REGION))
    outputs = {"LogGroup": "/fabric/S/nodes", "Node0InstanceId": "i-0"}
    return aws, Stack("S", REGION, "CREATE_COMPLETE", outputs)


def test_logs_print_each_page_as_it_arrives() -> None:
    aws, stack = fake_stack()
    printed: list[str] = []
    logs = FakeLogs([[(2, "b"), (1, "a")], [(3, "c")]], printed)
    aws._clients["logs"] = logs
    assert run_logs(aws, stack, None, False, None, printed.append) == 0
    assert printed == ["[node 0] a", "[node 0] b", "[node 0] c"]  # time order within a page
    assert logs.asked == [[], ["[node 0] a", "[node 0] b"]]  # page 1 shown before page 2 asked


def test_logs_follow_waits_out_throttling() -> None:
    aws, stack = fake_stack()
    printed: list[str] = []
    warnings: list[str] = []
    logs = FakeLogs([[(1, "a")]], printed)
    aws._clients["logs"] = logs
    throttled = ClientError(
        {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "FilterLogEvents"
    )
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            logs.failures = [throttled, throttled]
        if len(sleeps) == 5:
            raise KeyboardInterrupt

    code = run_logs(aws, stack, None, True, None, printed.append, sleep, warnings.append)
    assert code == 0
    assert printed == ["[node 0] a"]
    assert sleeps == [2.0, 4.0, 8.0, 2.0, 2.0]  # doubled while throttled, then back
    assert warnings[0] == "(CloudWatch Logs throttled the poll; trying again in 4s)"


def test_logs_follow_shows_an_event_shipped_late_once(endpoint: str) -> None:
    """The shipper's backoff: an event stamped 100 s before the newest one shown is ingested
    after it; the next polls look back far enough for it, and print it once."""
    world = deploy(endpoint, ["training"])
    newest = int(time.time() * 1000) - 5_000
    world.log(0, [(newest, "printed first")])
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:
            world.log(0, [(newest - 100_000, "shipped late")])
        elif len(polls) == 4:
            raise KeyboardInterrupt

    aws = connect(None)
    lines: list[str] = []
    assert run_logs(aws, load_stack(aws, world.stack), None, True, None, lines.append, sleep) == 0
    assert lines == ["[node 0] printed first", "[node 0] shipped late"]


# --- region ----------------------------------------------------------------------------------


def test_the_region_is_the_one_the_cdk_cli_deploys_to(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CDK CLI reads AWS_REGION first; boto3 alone would take AWS_DEFAULT_REGION."""
    world = deploy(endpoint, ["done"])  # in us-east-1, AWS_DEFAULT_REGION here
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert connect(None).region == "eu-west-1"
    assert connect("ap-south-1").region == "ap-south-1"  # --region first
    elsewhere = console("status", "--stack", world.stack)
    assert elsewhere.stderr.startswith(f"error: no stack {world.stack} in region eu-west-1")
    assert console("status", "--stack", world.stack, "--region", REGION).exit_code == 0
    monkeypatch.delenv("AWS_REGION")
    assert connect(None).region == REGION
