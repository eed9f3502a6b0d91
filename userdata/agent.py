"""The node agent: finds this node's rank and the main node, then runs `fabric run`.

    python -m userdata.agent [options] SCRIPT [-- SCRIPT_ARGS]

1. rank and node count from IMDSv2 instance tags, 2. the main address from SSM (waiting,
bounded, until node 0 has published it), 3. the interface that routes there and the thread
count, 4. `fabric run ...` (printed with --dry-run), 5. phase reporting, artifacts to S3 from
rank 0, and the guarded power-off when training ends.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import boto3
from boto3.exceptions import RetriesExceededError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from userdata.artifacts import ArtifactSync
from userdata.errors import AgentError
from userdata.fabric_command import (
    PRECISIONS,
    fabric_environment,
    fabric_run_command,
    threads_per_process,
    usable_cores,
)
from userdata.gpus import wait_for_gpus
from userdata.imds import Imds, NodeIdentity, read_identity
from userdata.main_address import wait_for_main_address
from userdata.network import interface_to
from userdata.peers import PeerWatch
from userdata.phase import PhaseReporter
from userdata.poweroff import power_off
from userdata.run_state import completed, mark_complete, restore
from userdata.spot import SpotWatcher

T = TypeVar("T")
TERMINATED = threading.Event()  # SIGTERM or SIGINT reached the agent
PROGRESS_INTERVAL = 15.0  # seconds between uploads of the script's progress.json
NO_PHASE_RECORDED = "no phase recorded: this node's phase parameter is named by its rank"


def log(message: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    print(f"{stamp} [fabric-agent] {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m userdata.agent",
        description="Find this node's rank and the main node, then run `fabric run SCRIPT`.",
    )
    parser.add_argument("script", help="the training script, relative to --workdir")
    parser.add_argument(
        "script_args", nargs=argparse.REMAINDER, help="after --: arguments passed to the script"
    )
    parser.add_argument(
        "--main-address-parameter", required=True, help="SSM parameter holding node 0's private IP"
    )
    parser.add_argument(
        "--phase-parameter",
        default="",
        help="SSM parameter for this node's phase; {rank} is filled in",
    )
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--devices-per-node", type=int, default=1)
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="32-true", help="fabric run --precision"
    )
    parser.add_argument(
        "--efa",
        action="store_true",
        help="let NCCL use EFA (libfabric and aws-ofi-nccl of the Deep Learning AMI)",
    )
    parser.add_argument("--main-port", type=int, default=29400)
    parser.add_argument("--run-dir", default="", help="where the payload writes its run")
    parser.add_argument(
        "--workdir",
        default="",
        help="the project folder: fabric run's working directory (default: the current one)",
    )
    parser.add_argument(
        "--artifacts-uri",
        default="",
        help="s3://bucket/stack/run: the run's files, restored from and copied to by rank 0",
    )
    parser.add_argument("--run-name", default="run", help="the run's name, for messages")
    parser.add_argument(
        "--run-fingerprint",
        default="",
        help="what the nodes train (code, arguments, world): a complete run trained with "
        "another fingerprint (more epochs, new code) goes on",
    )
    parser.add_argument(
        "--peer-poll-interval",
        type=float,
        default=15.0,
        help="seconds between looks at the other nodes' phases (one failed: stop)",
    )
    parser.add_argument(
        "--stop-when-done",
        action="store_true",
        help="power the node off when fabric run ends (only on real EC2)",
    )
    parser.add_argument(
        "--gpu-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for nvidia-smi to see every GPU (accelerator gpu)",
    )
    parser.add_argument(
        "--spot-poll-interval",
        type=float,
        default=5.0,
        help="seconds between looks at IMDS for a spot interruption notice",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times fabric run is started again after it fails",
    )
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=5.0,
        help="seconds between a failed fabric run and the next",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve everything, print the command line, run nothing",
    )
    parser.add_argument(
        "--main-address-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for node 0 to publish its address",
    )
    parser.add_argument(
        "--rendezvous-timeout",
        type=int,
        default=600,
        help="seconds torchrun waits for all nodes to join",
    )
    parser.add_argument("--imds-timeout", type=float, default=2.0)
    parser.add_argument(
        "--ssm-timeout", type=float, default=5.0, help="connect/read timeout of each SSM call"
    )
    parser.add_argument(
        "--sync-interval",
        type=float,
        default=60.0,
        help="seconds between artifact uploads from rank 0",
    )
    args = parser.parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    if args.devices_per_node < 1:
        parser.error("--devices-per-node must be at least 1")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be at least 0")
    return args


def aws_client(service: str, region: str, timeout: float):
    """Honours AWS_ENDPOINT_URL (boto3 reads it), so tests and rehearsals stay local."""
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "max_attempts": 3},
    )
    return boto3.client(service, region_name=region, config=config)


def resolve(
    args: argparse.Namespace, identity: NodeIdentity, ssm
) -> tuple[list[str], dict[str, str]]:
    main_address = wait_for_main_address(
        ssm, args.main_address_parameter, args.main_address_timeout, log=log
    )
    if identity.node_rank == 0 and main_address != identity.private_ip:
        raise AgentError(
            f"parameter {args.main_address_parameter} says {main_address}, but this node 0 "
            f"has {identity.private_ip}"
        )
    interface = interface_to(main_address)
    environment = fabric_environment(
        interface=interface,
        accelerator=args.accelerator,
        threads=threads_per_process(usable_cores(), args.devices_per_node),
        rendezvous_timeout=args.rendezvous_timeout,
        run_dir=args.run_dir or None,
        efa=args.efa,
    )
    command = fabric_run_command(
        node_rank=identity.node_rank,
        main_address=main_address,
        main_port=args.main_port,
        accelerator=args.accelerator,
        devices=args.devices_per_node,
        num_nodes=identity.num_nodes,
        script=args.script,
        script_args=args.script_args,
        precision=args.precision,
    )
    return command, environment


def run_fabric(
    command: list[str],
    environment: dict[str, str],
    watcher: SpotWatcher | None = None,
    workdir: str = "",
    peers: PeerWatch | None = None,
) -> int:
    """Runs fabric run in the project folder (as the manual procedure's `cd`), with the venv's
    bin first on PATH, its output streamed as it comes."""
    env = {**os.environ, **environment}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(command, env=env, cwd=workdir or None)
    if watcher:
        watcher.attach(process.pid)
    if peers:
        peers.attach(process)

    def forward(signum: int, _frame: object) -> None:
        # Stopped from outside (systemctl stop, shutdown): no restart, no power-off of our own.
        TERMINATED.set()
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_state(action: Callable[[], T], uri: str) -> T:
    """The run's state in S3, read once before training: unreadable is one clear line."""
    try:
        return action()
    except (BotoCoreError, ClientError, RetriesExceededError, OSError) as error:
        raise AgentError(f"cannot read the run's files in {uri}/: {error}") from None


def identify(imds: Imds) -> NodeIdentity:
    """read_identity, whose failures name the instance when IMDS can say which it is.

    A rank that cannot be read leaves no phase (its parameter is named by the rank): the
    error line in the journal and the console output is then all a user gets.
    """
    instance_id = imds.require("instance-id")
    try:
        return read_identity(imds)
    except AgentError as error:
        raise AgentError(f"{instance_id}: {error}") from None


def train(args: argparse.Namespace, reporter: PhaseReporter) -> int:
    imds = Imds(timeout=args.imds_timeout)
    identity = identify(imds)
    log(
        f"node {identity.node_rank} of {identity.num_nodes}: {identity.instance_id}, "
        f"{identity.private_ip}, {identity.region}"
    )
    ssm = aws_client("ssm", identity.region, args.ssm_timeout)
    if args.phase_parameter and not args.dry_run:
        reporter.ssm = ssm
        reporter.parameter = args.phase_parameter.format(rank=identity.node_rank)
    if args.accelerator == "gpu":
        reporter.record("waiting-for-gpus")
        gpus = wait_for_gpus(args.devices_per_node, args.gpu_timeout, log=log)
        log(f"nvidia-smi sees {gpus} GPU(s)")
    s3 = aws_client("s3", identity.region, max(args.ssm_timeout, 30.0))
    if args.artifacts_uri and not args.dry_run:
        marker = run_state(
            lambda: completed(s3, args.artifacts_uri, args.run_fingerprint), args.artifacts_uri
        )
        if marker:
            # Trained again in silence, it would look like a broken machine: say so instead.
            log(
                f"run {args.run_name} ended at {marker.get('finished', '?')}; its results are in "
                f"{args.artifacts_uri}/. To train again, deploy with a new -c run=NAME."
            )
            reporter.record(f"done: run {args.run_name} already complete ({args.artifacts_uri}/)")
            return 0
    reporter.record("waiting-for-main")
    command, environment = resolve(args, identity, ssm)
    if args.dry_run:
        print(shlex.join(command), flush=True)
        for key, value in sorted(environment.items()):
            print(f"{key}={value}", flush=True)
        return 0
    started = "training"
    sync = None
    if identity.node_rank == 0 and args.artifacts_uri and args.run_dir:
        reporter.record("restoring")
        restored = run_state(
            lambda: restore(s3, args.artifacts_uri, Path(args.run_dir)), args.artifacts_uri
        )
        started = f"training ({restored.describe()})"
        log(f"run {args.run_name}: {restored.describe()} ({args.artifacts_uri}/)")
        sync = ArtifactSync(
            s3, args.artifacts_uri, Path(args.run_dir), args.sync_interval, PROGRESS_INTERVAL
        )
        sync.mark_seen(restored.paths)  # in S3 already
        sync.start()
    log(f"running: {shlex.join(command)}")
    watcher = SpotWatcher(imds, args.spot_poll_interval, log)
    watcher.start()
    peers = None
    if args.phase_parameter:
        peers = PeerWatch(
            ssm,
            args.phase_parameter,
            identity.num_nodes,
            identity.node_rank,
            args.peer_poll_interval,
            log,
        )
        peers.start()
    status = supervise(command, environment, args, reporter, watcher, peers, started)
    watcher.stop()
    if peers:
        peers.stop()
    if sync:
        log(f"artifacts: {sync.stop()} file(s) uploaded to {args.artifacts_uri} at the end")
    if status != 0 and peers and peers.failed:
        raise AgentError(peers.reason)
    if watcher.notice:
        # Not a failure: the payload checkpointed; a new run resumes from there.
        reporter.record(f"interrupted: spot instance-action {watcher.notice}")
        return 0
    if status != 0:
        restarts = f" after {args.max_restarts} restart(s)" if args.max_restarts else ""
        raise AgentError(f"fabric run exited with status {status}{restarts}")
    if sync:
        try:
            mark_complete(s3, args.artifacts_uri, args.run_name, args.run_fingerprint)
        except (BotoCoreError, ClientError) as error:
            log(f"could not mark run {args.run_name} complete in {args.artifacts_uri}/: {error}")
    reporter.record("done")
    return status


def supervise(
    command: list[str],
    environment: dict[str, str],
    args: argparse.Namespace,
    reporter: PhaseReporter,
    watcher: SpotWatcher | None = None,
    peers: PeerWatch | None = None,
    started: str = "training",
) -> int:
    """Runs fabric run, again after a failure (a peer died: every node fails and restarts, and
    the payload resumes from its newest checkpoint), at most --max-restarts times; never again
    once a peer has failed for good or a spot notice came."""
    for attempt in range(args.max_restarts + 1):
        reporter.record(started if attempt == 0 else f"training (restart {attempt})")
        status = run_fabric(command, environment, watcher, args.workdir, peers)
        stopped = (watcher and watcher.notice) or (peers and peers.failed) or TERMINATED.is_set()
        if status == 0 or attempt == args.max_restarts or stopped:
            return status
        log(
            f"fabric run exited with status {status}: restart {attempt + 1} of "
            f"{args.max_restarts} in {args.restart_delay:g} s"
        )
        time.sleep(args.restart_delay)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reporter = PhaseReporter(None, None)
    status = 1
    try:
        status = train(args, reporter)
    except AgentError as error:
        # Before the rank is known there is no parameter to record the failure in: say so.
        unrecorded = bool(args.phase_parameter) and not args.dry_run and not reporter.parameter
        note = f" ({NO_PHASE_RECORDED})" if unrecorded else ""
        print(f"error: {error}{note}", file=sys.stderr, flush=True)
        reporter.record(f"failed: {error}")
    except Exception as error:  # a bug or an AWS error nobody foresaw: still failed, still off
        traceback.print_exc()
        reporter.record(f"failed: {type(error).__name__}: {error}")
    finally:
        # Whatever happened, a node that is done does not bill (unless stopped from outside).
        if args.stop_when_done and not TERMINATED.is_set():
            power_off(args.dry_run)
    return status


if __name__ == "__main__":
    sys.exit(main())
