"""The rehearsal: deploy the real template to an emulated AWS and boot every node for real.

    python -m rehearsal.run [--num-nodes 2] [--devices-per-node 2]
                            [--project DIR --script FILE] [-- SCRIPT_ARGS]

1. synth the real app with cdk.json's settings; 2. deploy it to moto (CloudFormation, EC2,
SSM, S3, IAM) after bootstrapping it; 3. give every emulated instance a network namespace
holding its private IP, an IMDSv2 stub with its id and tags, and run its real user data there
(rehearsal switch: no systemd, no power-off; the default project reuses this venv, a --project
runs the nodes' real install phases, offline, from the uv cache that installing it here filled);
4. check the training (world size, artifacts in S3, every phase "done", the same result as a
local-cluster run); 5. destroy the stack
and check that only the artifacts bucket remains. Everything it made is removed, also on failure:
every process it starts carries the run's id in FABRIC_REHEARSAL_ID, and writes its temporary
files in the run's work folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from local.process_groups import stop_groups
from local.project_venv import project_venv, torch_source, uv_binary
from rehearsal.emulated_aws import (
    CREDENTIAL_ENV,
    REGION,
    EmulatedAws,
    EmulatedInstance,
    bootstrap_and_upload,
    deploy,
    destroy,
    ensure_stack,
    remaining,
    stack_instances,
)
from rehearsal.imds_stub import node_values
from rehearsal.namespaces import EmulatedNetwork, namespaces_available
from stacks.cluster_app import STORAGE_STACK_ID, build_app, cdk_json_context, synthesize
from stacks.cluster_stack import VPC_CIDR
from stacks.config import PROJECT_DIR
from stacks.project import load_project, pinned_version
from userdata.phase import decode_phase
from userdata.run_layout import CHECKPOINT_STEP, COMPLETE_MARKER

IMDS_PORT = 1338
EXAMPLE_PROJECT = PROJECT_DIR / "trainer"
SUBNET_PREFIX_LENGTH = 24
# In the environment of every process the rehearsal starts, down to the training workers:
# the one thing they all carry (torchrun starts each worker in a session of its own).
RUN_ID_VARIABLE = "FABRIC_REHEARSAL_ID"
# Shorter than the local cluster's: what a process group leaves after it, the sweep for the
# run's id stops, and a rehearsal keeps no checkpoint of an interrupted run.
STOP_GRACE_SECONDS = 5.0
# A quarter of SSM's answers a ThrottlingException: every node must still train and record
# every phase (Parameter Store's throughput is shared by the whole account).
DEFAULT_THROTTLE = 0.25
STRAY_GRACE_SECONDS = 5.0
T = TypeVar("T")


class RehearsalError(RuntimeError):
    """A check that failed; the message is the one line the user sees."""


def log(message: str) -> None:
    print(f"[rehearsal] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rehearsal.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--devices-per-node", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the training")
    parser.add_argument(
        "--main-node-delay",
        type=float,
        default=0.0,
        help="boot node 0 this many seconds after the others (a late main node)",
    )
    parser.add_argument("--project", help="your project's folder (default: the example, trainer/)")
    parser.add_argument("--script", help="with --project: the script, relative to it")
    parser.add_argument(
        "--runs",
        action="store_true",
        help="also watch the run (status, logs, results), then deploy again three times: "
        "the run resumed by a new cluster from S3, a complete run not trained again, a change "
        "of arguments a new run",
    )
    parser.add_argument(
        "--fail-node",
        type=int,
        help="with --project: this node's install fails (no package to be had); the others "
        "must stop within the bound and record why",
    )
    parser.add_argument(
        "--spot-node",
        type=int,
        help="this node gets a spot interruption notice once training has begun (EC2 tells "
        "the reclaimed instance only): the run must stop as interrupted, never complete, and "
        "a new cluster must resume it",
    )
    parser.add_argument(
        "--throttle",
        type=float,
        default=DEFAULT_THROTTLE,
        help="share of SSM and CloudWatch Logs calls the emulated AWS refuses with "
        f"ThrottlingException, as a busy account does (default {DEFAULT_THROTTLE})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--manifest",
        type=Path,
        help="write what the run makes (its id, work folder, namespaces, links) to this file",
    )
    parser.add_argument(
        "script_args",
        nargs=argparse.REMAINDER,
        help="after --: the script's arguments (default: a short run)",
    )
    args = parser.parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    if (args.project is None) != (args.script is None):
        parser.error("--project and --script go together")
    if args.fail_node is not None and (args.project is None or args.runs):
        parser.error("--fail-node needs --project (a real install) and goes without --runs")
    if args.fail_node is not None and not 0 <= args.fail_node < args.num_nodes:
        parser.error(f"--fail-node must be from 0 to {args.num_nodes - 1}")
    if args.spot_node is not None and not 0 <= args.spot_node < args.num_nodes:
        parser.error(f"--spot-node must be from 0 to {args.num_nodes - 1}")
    if args.spot_node is not None and (args.runs or args.fail_node is not None):
        parser.error("--spot-node goes without --runs and --fail-node")
    if not 0.0 <= args.throttle < 1.0:
        parser.error("--throttle must be at least 0 and below 1")
    if not args.script_args and args.project is None:
        args.script_args = ["--epochs", "2", "--samples", "4096"]
    return args


class Phases:
    """Times each phase for the final report."""

    def __init__(self) -> None:
        self.durations: list[tuple[str, float, str]] = []

    def run(self, name: str, action: Callable[[], T]) -> T:
        log(f"{name} ...")
        started = time.monotonic()
        try:
            result = action()
        except BaseException:
            self.durations.append((name, time.monotonic() - started, "FAILED"))
            raise
        self.durations.append((name, time.monotonic() - started, "ok"))
        return result

    def report(self) -> None:
        print("\n[rehearsal] phase                              seconds  result", flush=True)
        for name, seconds, result in self.durations:
            print(f"[rehearsal] {name:<34} {seconds:7.1f}  {result}", flush=True)


class Manifest:
    """What the run made, rewritten at each change: a leftover check finds things by the
    names the run itself gave them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.values: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.values.update(values)
        if self.path is not None:  # replaced whole: a reader never sees half of it
            partial = self.path.with_name(f"{self.path.name}.partial")
            partial.write_text(json.dumps(self.values, indent=2))
            partial.replace(self.path)


def processes_carrying(variable: str, value: str) -> list[int]:
    """Live processes (not this one) with variable=value in their environment."""
    marker = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive(proc_entry: Path) -> bool:
    try:
        return "\nState:\tZ" not in (proc_entry / "status").read_text()
    except OSError:
        return False


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(gone)"
    command = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return command or "(exiting)"


def stop_strays(run_id: str, network: EmulatedNetwork) -> list[str]:
    """Stops what stopping the process groups missed; returns one line per stray.

    A worker outlives its node's process group when torchrun dies before stopping it. Strays
    are found by the run's id in their environment, and by being inside the run's namespaces
    (whatever their environment: nothing else is started there).
    """
    pids = sorted(set(processes_carrying(RUN_ID_VARIABLE, run_id)) | set(network.processes()))
    strays = [f"stopped a stray process {pid}: {_command_line(pid)}" for pid in pids]
    for pid in pids:
        _kill(pid, signal.SIGTERM)
        _kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
    deadline = time.monotonic() + STRAY_GRACE_SECONDS
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(Path(f"/proc/{pid}"))]
        time.sleep(0.1)
    # Found again rather than trusted: a pid may have been reused during the grace period.
    ours = set(processes_carrying(RUN_ID_VARIABLE, run_id)) | set(network.processes())
    for pid in ours.intersection(pids):
        _kill(pid, signal.SIGKILL)
    return strays


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class NodeProcesses:
    """Every process started inside the namespaces, each in its own process group."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        command: list[str],
        env: dict[str, str],
        cpu: int | None = None,
        log_path: Path | None = None,
        prefix: str = "",
    ) -> subprocess.Popen[bytes]:
        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pin,
        )
        self.processes.append(process)
        if log_path is not None:
            threading.Thread(target=_relay, args=(process, log_path, prefix), daemon=True).start()
        return process

    def stop_all(self) -> None:
        stop_groups(self.processes, grace=STOP_GRACE_SECONDS)
        self.processes.clear()


def _relay(process: subprocess.Popen[bytes], log_path: Path, prefix: str) -> None:
    assert process.stdout is not None
    with log_path.open("w") as log_file:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            log_file.write(line)
            log_file.flush()
            if "it/s]" not in line:  # progress bars stay in the log file
                sys.stdout.write(f"{prefix}{line}")
                sys.stdout.flush()


def _first_line(process: subprocess.Popen[bytes], what: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line:
        raise RehearsalError(f"{what} did not start (exit status {process.poll()})")
    return line


@contextmanager
def work_folder(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fabric-rehearsal-"))
    try:
        (folder / "tmp").mkdir()  # TMPDIR of everything it starts (torchrun's log folders)
        yield folder
    finally:
        if keep:
            log(f"kept the work folder {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def synth(folder: Path, args: argparse.Namespace, **overrides: str) -> tuple[Path, str, Any]:
    project = {"project": args.project, "script": args.script} if args.project else {}
    settings = {
        "num_nodes": args.num_nodes,
        "devices_per_node": args.devices_per_node,
        "script_args": shlex.join(args.script_args),
        **project,
    }
    context = cdk_json_context(**(settings | overrides))
    app, stack = build_app(context, outdir=str(folder / "cdk.out"))
    synthesize(app, stack)
    return folder / "cdk.out", stack.artifact_id, stack.config


def boot_nodes(
    folder: Path,
    aws: EmulatedAws,
    network: EmulatedNetwork,
    nodes: list[EmulatedInstance],
    processes: NodeProcesses,
    run_id: str,
    install_environment: dict[str, str],
    work: Path,
    main_node_delay: float = 0.0,
    fail_node: int | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Each node's IMDS stub serves a spot notice once spot_notice_file(folder, rank) exists."""
    # A node whose install must fail: no torch wheel where its install step looks for one.
    (folder / "no-wheels").mkdir(exist_ok=True)
    broken_install = {"FABRIC_TORCH_INDEX": str(folder / "no-wheels")}
    base_env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        **CREDENTIAL_ENV,
        **run_environment(work, run_id),
    }
    cpus = sorted(os.sched_getaffinity(0))
    boots = []
    for node in nodes:
        prefix = network.exec_prefix(node.rank)
        values = node_values(
            node.instance_id,
            node.private_ip,
            node.tags.get("fabric:node-rank"),
            node.tags.get("fabric:num-nodes"),
        )
        stub = processes.start(
            [
                *prefix,
                sys.executable,
                "-m",
                "rehearsal.imds_stub",
                "--host",
                "127.0.0.1",
                "--port",
                str(IMDS_PORT),
                "--values",
                json.dumps(values),
                "--notice-file",
                str(spot_notice_file(folder, node.rank)),
            ],
            env={**base_env, "PYTHONPATH": str(PROJECT_DIR)},
        )
        _first_line(stub, f"the IMDS stub of node {node.rank}")
        forward = processes.start(
            [
                *prefix,
                sys.executable,
                "-m",
                "rehearsal.forward",
                "--port",
                str(aws.port),
                "--unix",
                str(aws.socket_path),
            ],
            env={**base_env, "PYTHONPATH": str(PROJECT_DIR)},
        )
        _first_line(forward, f"the AWS forwarder of node {node.rank}")
    for node in reversed(nodes):  # nodes boot in any order on EC2: the main node last here
        if node.rank == 0 and main_node_delay:
            log(f"node 0 boots in {main_node_delay:g} s")
            time.sleep(main_node_delay)
        home = folder / f"node-{node.rank}"
        home.mkdir()
        script = home / "user-data.sh"
        script.write_text(node.user_data)
        env = {
            **base_env,
            "HOME": str(home),
            **install_environment,
            **(broken_install if node.rank == fail_node else {}),
            "FABRIC_REHEARSAL_HOME": str(home / "fabric"),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{aws.port}",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{IMDS_PORT}",
        }
        log(
            f"booting node {node.rank} ({node.instance_id}, {node.private_ip}) in "
            f"{network.node_namespace(node.rank)}"
        )
        boots.append(
            processes.start(
                [*network.exec_prefix(node.rank), "bash", str(script)],
                env=env,
                cpu=cpus[node.rank % len(cpus)],  # each node its own core, as on separate machines
                log_path=home / "console.log",
                prefix=f"[node {node.rank}] ",
            )
        )
    return list(reversed(boots))


def spot_notice_file(folder: Path, rank: int) -> Path:
    return folder / f"spot-notice-{rank}.json"


def wait_for_boots(
    boots: list[subprocess.Popen[bytes]],
    timeout: float,
    expect_failure: bool = False,
    on_tick: Callable[[], None] | None = None,
) -> list[float]:
    """When each node's user data ended (time.monotonic()); any failure is an error unless
    one is expected. on_tick: called while waiting (a scenario acting on a running cluster)."""
    deadline, ended = time.monotonic() + timeout, [0.0] * len(boots)
    while not all(ended):
        if on_tick:
            on_tick()
        for rank, boot in enumerate(boots):
            if not ended[rank] and boot.poll() is not None:
                ended[rank] = time.monotonic()
                if boot.returncode != 0 and not expect_failure:
                    raise RehearsalError(
                        f"node {rank}'s user data exited with status {boot.returncode}"
                    )
        if time.monotonic() > deadline:
            late = [rank for rank, when in enumerate(ended) if not when]
            raise RehearsalError(f"node(s) {late} did not finish within {timeout:g} s")
        time.sleep(0.2)
    return ended


def check_training(
    aws: EmulatedAws,
    config: Any,
    outputs: dict[str, str],
    folder: Path,
    nodes: list[EmulatedInstance],
) -> dict[str, Any]:
    ssm, s3 = aws.client("ssm"), aws.client("s3")
    phases = {n.rank: phase_of(ssm, config, n) for n in nodes}
    if any(phase != "done" for phase in phases.values()):
        raise RehearsalError(f"not every node reported done: {phases}")
    for node in nodes:
        # Through a throttling AWS: every phase recorded, in order, by this instance.
        recorded = phase_history(ssm, config, node)
        expected = ["installing", "waiting-for-main", *(["restoring"] if node.rank == 0 else [])]
        steps = [text for text in recorded if not text.startswith("training")]
        if (
            steps[: len(expected)] != expected
            or recorded[-1] != "done"
            or not any(text.startswith("training") for text in recorded)
        ):
            raise RehearsalError(f"node {node.rank} recorded the phases {recorded}")
    check_socket_interfaces(folder, nodes)
    bucket, prefix = outputs["ArtifactsBucket"], f"{config.stack_name}/{outputs['RunName']}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    checkpoints = [key for key in keys if key.endswith(".ckpt")]
    if not checkpoints or f"{prefix}/summary.json" not in keys:
        raise RehearsalError(f"artifacts missing in s3://{bucket}/{prefix}/: {keys}")
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/summary.json")["Body"].read())
    expected = config.num_nodes * config.devices_per_node
    if summary["world_size"] != expected:
        raise RehearsalError(f"world size {summary['world_size']}, expected {expected}")
    for node in nodes:
        console = (folder / f"node-{node.rank}" / "console.log").read_text()
        if config.stop_when_done and "would stop now" not in console:
            raise RehearsalError(f"node {node.rank} did not record its final stop")
    log(
        f"every node done; world size {summary['world_size']}; {len(checkpoints)} checkpoint(s) "
        f"and the summary in s3://{bucket}/{prefix}/"
    )
    return summary


def phase_of(ssm: Any, config: Any, node: EmulatedInstance) -> str:
    """The node's phase as the console reads it: written by this instance (or the stack)."""
    value = ssm.get_parameter(Name=config.phase_parameter(node.rank))["Parameter"]["Value"]
    phase = decode_phase(value)
    if phase.instance not in (None, node.instance_id):
        raise RehearsalError(f"node {node.rank}'s phase was written by {phase.instance}")
    return phase.text


def phase_history(ssm: Any, config: Any, node: EmulatedInstance) -> list[str]:
    """Every phase the node's instance recorded, oldest first."""
    recorded = []
    pages = ssm.get_paginator("get_parameter_history").paginate(
        Name=config.phase_parameter(node.rank)
    )
    for page in pages:
        for version in page["Parameters"]:
            phase = decode_phase(version["Value"])
            if phase.instance == node.instance_id:
                recorded.append(phase.text)
    return recorded


INTERFACE_LINE = re.compile(r"network: gloo and NCCL bind (\S+) to reach the main node (\S+)")


def check_socket_interfaces(folder: Path, nodes: list[EmulatedInstance]) -> None:
    """No node binds gloo/NCCL to lo: on node 0 the main address is its own, which Linux routes
    through lo, and NCCL would advertise 127.0.0.1 to every other node."""
    for node in nodes:
        found = INTERFACE_LINE.findall((folder / f"node-{node.rank}" / "console.log").read_text())
        if not found:
            raise RehearsalError(f"node {node.rank} did not say which interface it binds")
        if any(interface == "lo" for interface, _ in found):
            raise RehearsalError(f"node {node.rank} binds gloo/NCCL to lo: {found}")
    log("no node binds gloo/NCCL to lo (node 0 binds the interface that holds its address)")


def run_environment(folder: Path, run_id: str) -> dict[str, str]:
    """What every process the rehearsal starts gets: the run's id and a TMPDIR it removes."""
    return {RUN_ID_VARIABLE: run_id, "TMPDIR": str(folder / "tmp")}


def local_cluster_summary(folder: Path, config: Any, run_id: str) -> dict[str, Any]:
    run_dir = folder / "local-run"
    if config.project == EXAMPLE_PROJECT:  # this venv, as `make local` runs it
        project = ["--script", (EXAMPLE_PROJECT / config.script).relative_to(PROJECT_DIR)]
    else:  # the venv that the rehearsal installed it into
        project = ["--project", config.project, "--script", config.script]
    command = [
        sys.executable, "-m", "local.cluster", *map(str, project),
        "--num-nodes", str(config.num_nodes), "--devices-per-node", str(config.devices_per_node),
        "--run-dir", str(run_dir), "--", *config.script_args,
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=PROJECT_DIR,
        env={**os.environ, **run_environment(folder, run_id)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RehearsalError(f"the local cluster failed: {result.stderr.strip()[-500:]}")
    return json.loads((run_dir / "summary.json").read_text())


def same_result(cluster: dict[str, Any], local: dict[str, Any]) -> str:
    """The final weights' hash where the script writes one (the example), else the final loss:
    on CPU with gloo, the same seed gives bit-identical results over loopback and namespaces."""
    key = "weights_sha256" if "weights_sha256" in cluster else "final_loss"
    if key not in cluster or cluster[key] != local.get(key):
        raise RehearsalError(
            f"{key} differs from the local cluster's: {cluster.get(key)} != {local.get(key)}"
        )
    return f"{key} {str(cluster[key])[:16]}"


def install_here(args: argparse.Namespace) -> dict[str, str]:
    """The environment of the nodes' install phases. The example reuses this venv; a --project
    is installed here first (the local cluster's cached venv), which fills uv's cache, from
    which every node's real install phases then run offline (no node reaches the internet)."""
    if args.project is None:
        return {"FABRIC_REHEARSAL_VENV": sys.prefix}
    project = load_project(args.project, args.script, Path.cwd(), pinned_version("torch"))
    project_venv(project, "cpu")
    uv = uv_binary()
    cache = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, check=True)
    environment = {
        "FABRIC_REHEARSAL_UV": uv,
        "FABRIC_REHEARSAL_PYTHON": sys.executable,
        "UV_CACHE_DIR": cache.stdout.strip(),
        "UV_OFFLINE": "1",
        "UV_NO_PROGRESS": "1",
    }
    if torch_source():
        environment["FABRIC_TORCH_INDEX"] = torch_source()
    return environment


def create_network(network: EmulatedNetwork, addresses: list[str], manifest: Manifest) -> None:
    try:
        network.create(addresses)
    finally:  # also what a failed create made
        manifest.update(namespaces=dict(network.inodes), links=list(network.links))
        made = [f"{name} (net:[{inode}])" for name, inode in network.inodes.items()]
        log(f"namespaces {', '.join(made) or 'none'}")


@dataclass
class Deployment:
    """One `cdk deploy` on the emulated AWS and the boot of its nodes."""

    folder: Path  # the nodes' homes and their console logs
    config: Any
    outputs: dict[str, str]
    nodes: list[EmulatedInstance]


class Rehearsal:
    """The emulated AWS, the namespaces and the node processes of one rehearsal."""

    def __init__(
        self,
        args: argparse.Namespace,
        folder: Path,
        phases: Phases,
        run_id: str,
        manifest: Manifest,
    ) -> None:
        self.args, self.folder, self.phases, self.run_id = args, folder, phases, run_id
        self.manifest = manifest
        self.aws = EmulatedAws(folder / "aws.sock", args.throttle).start()
        # From the run's id: two runs at once never share a name; short, as interface names are.
        self.network = EmulatedNetwork(f"fr{run_id[:6]}", SUBNET_PREFIX_LENGTH)
        self.processes = NodeProcesses()
        self.installs: dict[str, str] = {}
        self.deploys = 0
        self.ended: list[float] = []  # when each node's user data ended, last deploy

    def deploy(self, what: str, spot_node: int | None = None, **overrides: str) -> Deployment:
        """Synth with these settings, deploy, boot every node and wait for them to end;
        spot_node gets a spot notice once node 0 has trained its first step."""
        self.deploys += 1
        folder = self.folder / f"deploy-{self.deploys}"
        folder.mkdir()
        log(f"deploy {self.deploys}: {what}")
        phases, aws = self.phases, self.aws
        assembly, artifact, config = phases.run(
            "synth the app", lambda: synth(folder, self.args, **overrides)
        )
        count = phases.run(
            "bootstrap, upload assets", lambda: bootstrap_and_upload(aws, assembly, artifact)
        )
        log(f"{count} asset(s) uploaded to the emulated S3 at {aws.url}")
        created, storage = phases.run(
            "the storage stack",
            lambda: ensure_stack(
                aws, assembly / f"{STORAGE_STACK_ID}.template.json", config.storage_stack
            ),
        )
        log(
            f"storage stack {config.storage_stack} {'created' if created else 'kept as it is'}: "
            f"s3://{storage['ArtifactsBucket']}, log group {storage['LogGroup']}"
        )
        cluster = phases.run(
            "create the stack",
            lambda: deploy(aws, assembly / f"{artifact}.template.json", config.stack_name),
        )
        outputs = {**storage, **cluster}  # what the console merges the same way
        nodes = stack_instances(aws, config.stack_name)
        main = aws.client("ssm").get_parameter(Name=config.main_address_parameter)
        if main["Parameter"]["Value"] != nodes[0].private_ip:
            raise RehearsalError(
                f"{config.main_address_parameter} is "
                f"{main['Parameter']['Value']}, node 0 has {nodes[0].private_ip}"
            )
        log(f"CREATE_COMPLETE; {config.main_address_parameter} = node 0's {nodes[0].private_ip}")
        log(f"run {outputs['RunName']} in s3://{outputs['ArtifactsBucket']}/{config.stack_name}/")
        phases.run(
            "create the namespaces",
            lambda: create_network(
                self.network, [node.private_ip for node in nodes], self.manifest
            ),
        )
        boots = phases.run(
            "start stubs, boot the nodes",
            lambda: boot_nodes(
                folder,
                aws,
                self.network,
                nodes,
                self.processes,
                self.run_id,
                self.installs,
                self.folder,
                self.args.main_node_delay if self.deploys == 1 else 0.0,
                self.args.fail_node,
            ),
        )
        on_tick = None if spot_node is None else notice_once_training(folder, spot_node)
        self.ended = phases.run(
            "train (boot to done)",
            lambda: wait_for_boots(
                boots, self.args.timeout, self.args.fail_node is not None, on_tick
            ),
        )
        log(f"the nodes met an AWS that throttles: {aws.node_throttle.describe()}")
        return Deployment(folder, config, outputs, nodes)

    def destroy(self, deployment: Deployment) -> None:
        """`make destroy` (the cluster stack only), and a check that only the storage stack's
        artifacts bucket (and logs) remain of it."""
        self.processes.stop_all()
        config, outputs = deployment.config, deployment.outputs
        notes = self.phases.run(
            "destroy the stack", lambda: destroy(self.aws, config.stack_name, VPC_CIDR)
        )
        for note in notes:
            log(note)
        failures = self.network.delete()
        if failures:
            raise RehearsalError(f"namespaces left after deploy {self.deploys}: {failures}")
        left = remaining(self.aws, config.stack_name, VPC_CIDR, outputs["ArtifactsBucket"])
        gone = {kind: names for kind, names in left.items() if kind != "buckets" and names}
        if gone or left["buckets"] != [outputs["ArtifactsBucket"]]:
            raise RehearsalError(f"after destroy, expected only the artifacts bucket: {left}")
        log(f"after destroy only the artifacts bucket remains: {left['buckets'][0]}")

    def close(self) -> None:
        self.processes.stop_all()
        failures = stop_strays(self.run_id, self.network)
        failures += self.network.delete()
        self.aws.stop()
        for failure in failures:
            log(f"cleanup: {failure}")


def agent_output(deployment: Deployment, rank: int) -> str:
    return (deployment.folder / f"node-{rank}" / "console.log").read_text()


def rehearse(
    args: argparse.Namespace, folder: Path, phases: Phases, run_id: str, manifest: Manifest
) -> None:
    rehearsal = Rehearsal(args, folder, phases, run_id, manifest)
    try:
        rehearsal.installs = phases.run("install the project here", lambda: install_here(args))
        first = rehearsal.deploy("the settings given", spot_node=args.spot_node)
        if args.spot_node is not None:
            phases.run("check the interruption", lambda: check_interrupted(rehearsal, first))
            rehearsal.destroy(first)
            check_resumed(rehearsal, first)
            return
        if args.fail_node is not None:
            phases.run("check the failure", lambda: check_failed_node(rehearsal, first))
            rehearsal.destroy(first)
            return
        summary = phases.run(
            "check phases and artifacts",
            lambda: check_training(
                rehearsal.aws, first.config, first.outputs, first.folder, first.nodes
            ),
        )
        local = phases.run(
            "local cluster, same settings",
            lambda: local_cluster_summary(folder, first.config, run_id),
        )
        log(f"the same result as the local cluster, bit for bit ({same_result(summary, local)})")
        if args.runs:
            phases.run("watch it: status, logs, results", lambda: check_console(rehearsal, first))
        rehearsal.destroy(first)
        if args.runs:
            check_runs(rehearsal, first, summary)
    finally:
        rehearsal.close()


# A peer's failure is seen within the agent's poll (15 s); then fabric run stops.
FAILED_PEER_BOUND = 45.0


def check_failed_node(rehearsal: Rehearsal, deployment: Deployment) -> None:
    """One node's install fails: it records the installer's message; every other node stops
    its fabric run within the bound, records why, and would power off."""
    failed, ssm = rehearsal.args.fail_node, rehearsal.aws.client("ssm")
    phases = {node.rank: phase_of(ssm, deployment.config, node) for node in deployment.nodes}
    if not phases[failed].startswith("failed: install: "):
        raise RehearsalError(f"node {failed} recorded {phases[failed]!r}, not an install failure")
    cause = f"failed: node {failed} failed ({phases[failed].removeprefix('failed: ')})"
    for node in deployment.nodes:
        if node.rank == failed:
            continue
        if phases[node.rank] != cause:
            raise RehearsalError(f"node {node.rank} recorded {phases[node.rank]!r}")
        after = rehearsal.ended[node.rank] - rehearsal.ended[failed]
        if after > FAILED_PEER_BOUND:
            raise RehearsalError(
                f"node {node.rank} went on {after:.0f} s after node {failed} failed"
            )
        if "would stop now" not in agent_output(deployment, node.rank):
            raise RehearsalError(f"node {node.rank} did not record its final stop")
    slowest = max(rehearsal.ended) - rehearsal.ended[failed]
    log(
        f"node {failed}'s install failed ({phases[failed][:80]}...); every other node stopped "
        f"within {slowest:.0f} s and recorded it"
    )


SPOT_NOTICE = '{"action": "terminate", "time": "2026-11-29T21:00:00Z"}'


def notice_once_training(folder: Path, rank: int) -> Callable[[], None]:
    """EC2 tells the reclaimed instance only: node `rank`'s IMDS serves the notice once node 0
    has trained a step."""

    def tick() -> None:
        notice = spot_notice_file(folder, rank)
        main_console = folder / "node-0" / "console.log"
        if notice.exists() or not main_console.exists():
            return
        if "first step done" in main_console.read_text(errors="replace"):
            notice.write_text(SPOT_NOTICE)
            log(f"spot interruption notice to node {rank} (to it alone, as EC2 sends it)")

    return tick


def check_interrupted(rehearsal: Rehearsal, deployment: Deployment) -> None:
    """The reclaimed node says so; every other node, node 0 included, says the cluster was
    interrupted (never done); the newest checkpoint is in S3 and the run is not complete."""
    spot, ssm, s3 = (
        rehearsal.args.spot_node,
        rehearsal.aws.client("ssm"),
        rehearsal.aws.client("s3"),
    )
    config, outputs = deployment.config, deployment.outputs
    if not spot_notice_file(deployment.folder, spot).exists():
        raise RehearsalError("training ended before the spot notice: train longer")
    cause = f"node {spot} interrupted (spot instance-action {SPOT_NOTICE})"
    for node in deployment.nodes:
        phase = phase_of(ssm, config, node)
        expected = f"interrupted: spot instance-action {SPOT_NOTICE}"
        if node.rank != spot:
            expected = f"interrupted: {cause}"
        if not phase.startswith(expected):
            raise RehearsalError(f"node {node.rank} recorded {phase!r}, not {expected!r}")
        if node.rank == 0 and ("; newest checkpoint " not in phase or " NOT in S3" in phase):
            raise RehearsalError(f"node 0 did not upload the newest checkpoint: {phase!r}")
        if config.stop_when_done and "would stop now" not in agent_output(deployment, node.rank):
            raise RehearsalError(f"node {node.rank} did not record its final stop")
    bucket, prefix = outputs["ArtifactsBucket"], f"{config.stack_name}/{outputs['RunName']}/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    names = {key.removeprefix(prefix) for key in keys}
    if COMPLETE_MARKER in names or "summary.json" in names:
        raise RehearsalError(f"an interrupted run was marked complete: {sorted(names)}")
    if not any(CHECKPOINT_STEP.search(name) for name in names):
        raise RehearsalError(f"no checkpoint of the interrupted run in S3: {sorted(names)}")
    check_socket_interfaces(deployment.folder, deployment.nodes)
    log(f"a notice on node {spot} interrupted every node; no node said done; checkpoint in S3")


def check_resumed(rehearsal: Rehearsal, first: Deployment) -> None:
    """The interrupted run goes on with a new cluster, from its checkpoint in S3, to the end."""
    run, bucket = first.outputs["RunName"], first.outputs["ArtifactsBucket"]
    # No artifacts_bucket: the storage stack outlived the destroyed cluster, its runs with it.
    second = rehearsal.deploy(f"run {run} again on a new cluster", run=run)
    if second.outputs["ArtifactsBucket"] != bucket:
        raise RehearsalError(f"the new cluster's bucket is not {bucket}: {second.outputs}")
    resumed = re.search(r"training \(resumed from step (\d+)\)", agent_output(second, 0))
    if not resumed or int(resumed.group(1)) == 0:
        raise RehearsalError("node 0 of the new cluster did not resume the interrupted run")
    summary = rehearsal.phases.run(
        "check phases and artifacts",
        lambda: check_training(
            rehearsal.aws, second.config, second.outputs, second.folder, second.nodes
        ),
    )
    log(
        f"a new cluster resumed the interrupted run from step {resumed.group(1)} "
        f"to {summary['steps']}"
    )
    rehearsal.destroy(second)


def console(rehearsal: Rehearsal, *command: str) -> subprocess.CompletedProcess[str]:
    """`make status` and friends, as a user runs them, against the emulated AWS."""
    env = {
        **os.environ,
        **CREDENTIAL_ENV,
        **run_environment(rehearsal.folder, rehearsal.run_id),
        "AWS_ENDPOINT_URL": rehearsal.aws.url,
        "AWS_DEFAULT_REGION": REGION,
    }
    return subprocess.run(
        [sys.executable, "-m", "console", *command],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_console(rehearsal: Rehearsal, deployment: Deployment) -> None:
    stack, run = deployment.config.stack_name, deployment.outputs["RunName"]
    status = console(rehearsal, "status", "--stack", stack)
    if status.returncode != 0 or f"run {run}: complete" not in status.stdout:
        raise RehearsalError(f"make status: {status.stdout[-800:]} {status.stderr[-400:]}")
    for node in deployment.nodes:
        if not any(
            node.instance_id in line and "done" in line for line in status.stdout.splitlines()
        ):
            raise RehearsalError(f"make status does not show node {node.rank} done")
    logs = console(rehearsal, "logs", "--stack", stack)
    for node in deployment.nodes:
        lines = [
            line for line in logs.stdout.splitlines() if line.startswith(f"[node {node.rank}] ")
        ]
        if not any("[fabric-agent]" in line for line in lines) or not any(
            "fabric-boot" in line for line in lines
        ):
            raise RehearsalError(f"make logs: no boot or agent line of node {node.rank}")
    if not any("training: world size" in line for line in logs.stdout.splitlines()):
        raise RehearsalError("make logs: no training line")
    results = console(
        rehearsal, "results", "--stack", stack, "--dest", str(rehearsal.folder / "runs")
    )
    local = rehearsal.folder / "runs" / stack / run / "summary.json"
    s3 = rehearsal.aws.client("s3")
    key = f"{stack}/{run}/summary.json"
    remote = s3.get_object(Bucket=deployment.outputs["ArtifactsBucket"], Key=key)["Body"].read()
    if results.returncode != 0 or not local.is_file() or local.read_bytes() != remote:
        raise RehearsalError(f"make results: {results.stdout[-500:]} {results.stderr[-500:]}")
    log(f"make status, logs and results: every node done, its logs, the summary ({local})")


def train_on(script_args: list[str], steps: int) -> tuple[list[str], int]:
    """The script's arguments to train on from a run that ended at `steps`: one more epoch
    (--epochs, the example) or 10 more steps (--max-steps); and the run's total steps then."""
    more = list(script_args)
    if "--max-steps" in more:
        at = more.index("--max-steps") + 1
        more[at] = str(int(more[at]) + 10)
        return more, int(more[at])
    if "--epochs" in more:
        at = more.index("--epochs") + 1
        epochs = int(more[at])
        more[at] = str(epochs + 1)
        return more, steps + steps // epochs
    raise RehearsalError("--runs needs --epochs or --max-steps in the script's arguments")


def check_runs(rehearsal: Rehearsal, first: Deployment, summary: dict[str, Any]) -> None:
    """A cluster made again continues the run from S3; a complete run is not trained again; a
    change of arguments is a new run beside the old one."""
    run, bucket = first.outputs["RunName"], first.outputs["ArtifactsBucket"]
    more, total = train_on(rehearsal.args.script_args, summary["steps"])
    again = {"run": run, "script_args": shlex.join(more)}  # no flag: the storage stayed
    second = rehearsal.deploy(f"run {run} again, to train on, on a new cluster", **again)
    s3 = rehearsal.aws.client("s3")
    key = f"{first.config.stack_name}/{run}/summary.json"
    resumed = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    if f"training (resumed from step {summary['steps']})" not in agent_output(second, 0):
        raise RehearsalError(f"node 0 did not resume from step {summary['steps']} in S3")
    if resumed["steps"] != total or resumed["steps_this_run"] != total - summary["steps"]:
        raise RehearsalError(
            f"the resumed run ended at step {resumed['steps']} after "
            f"{resumed['steps_this_run']} step(s); expected {total}"
        )
    log(f"a new cluster resumed run {run} from step {summary['steps']} to {resumed['steps']}")
    rehearsal.destroy(second)

    third = rehearsal.deploy(f"run {run} once more, the same: complete", **again)
    ssm = rehearsal.aws.client("ssm")
    for node in third.nodes:
        phase = phase_of(ssm, third.config, node)
        if not phase.startswith(f"done: run {run} already complete"):
            raise RehearsalError(f"node {node.rank}: {phase!r}, not 'already complete'")
        if "running: " in agent_output(third, node.rank):
            raise RehearsalError(f"node {node.rank} trained a complete run again")
    log(f"run {run} again: every node says it is complete, and nothing trained")
    rehearsal.destroy(third)

    changed = shlex.join([*rehearsal.args.script_args, "--seed", "7"])
    fourth = rehearsal.deploy("changed arguments: a new run", script_args=changed)
    new_run = fourth.outputs["RunName"]
    listed = console(rehearsal, "runs", "--stack", fourth.config.stack_name)
    if new_run == run or run not in listed.stdout or new_run not in listed.stdout:
        raise RehearsalError(f"make runs: {listed.stdout[-600:]} {listed.stderr[-300:]}")
    log(f"changed arguments trained a new run {new_run} beside {run} (make runs lists both)")
    rehearsal.destroy(fourth)
    check_storage_outlives_clusters(rehearsal, fourth, [run, new_run])


def check_storage_outlives_clusters(
    rehearsal: Rehearsal, last: Deployment, runs: list[str]
) -> None:
    """The cluster is gone, its runs are not (make runs finds them through the storage
    stack); make destroy-storage says what it deletes, then deletes exactly that."""
    config, outputs = last.config, last.outputs
    listed = console(rehearsal, "runs", "--stack", config.stack_name)
    if listed.returncode != 0 or not all(name in listed.stdout for name in runs):
        raise RehearsalError(f"make runs of a destroyed cluster: {listed.stdout} {listed.stderr}")
    log(f"make runs after destroy: the runs of cluster {config.stack_name} are still listed")
    destroyed = console(rehearsal, "destroy-storage", "--storage", config.storage_stack, "--yes")
    said = destroyed.stdout
    if destroyed.returncode != 0 or not all(
        f"{config.stack_name}/{name}:" in said for name in runs
    ):
        raise RehearsalError(f"make destroy-storage: {said} {destroyed.stderr}")
    aws = rehearsal.aws
    buckets = [b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]]
    groups = aws.client("logs").describe_log_groups(logGroupNamePrefix=outputs["LogGroup"])
    stacks = [
        stack["StackName"]
        for stack in aws.client("cloudformation").describe_stacks()["Stacks"]
        if stack["StackStatus"] != "DELETE_COMPLETE"
    ]
    if (
        outputs["ArtifactsBucket"] in buckets
        or groups["logGroups"]
        or config.storage_stack in stacks
    ):
        raise RehearsalError(f"after destroy-storage: {buckets} {groups['logGroups']} {stacks}")
    log(f"make destroy-storage deleted what it said: {said.strip().splitlines()[-2]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    warnings.filterwarnings("ignore", module="moto")
    reason = namespaces_available()
    if reason:
        print(f"[rehearsal] error: {reason}", file=sys.stderr)
        return 1

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)  # cleanup runs for SIGTERM as for Ctrl-C
    phases = Phases()
    run_id = uuid.uuid4().hex
    manifest = Manifest(args.manifest)
    log(f"run {run_id} (in {RUN_ID_VARIABLE} of every process it starts)")
    try:
        with work_folder(args.keep) as folder:
            manifest.update(
                run_id=run_id, marker=f"{RUN_ID_VARIABLE}={run_id}", work_folder=str(folder)
            )
            rehearse(args, folder, phases, run_id, manifest)
    except RehearsalError as error:
        phases.report()
        print(f"[rehearsal] error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[rehearsal] interrupted; everything it made is removed", file=sys.stderr)
        return 130
    phases.report()
    log("rehearsal passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
