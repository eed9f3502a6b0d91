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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from boto3.exceptions import RetriesExceededError
from botocore.exceptions import BotoCoreError, ClientError

from userdata.artifacts import ArtifactSync
from userdata.aws_clients import aws_client
from userdata.cluster_control import FAILED, INTERRUPTED, ClusterControl, Stop, StopWatch
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
from userdata.launch import STATUS_DIR_ENV
from userdata.launch_status import clear, outcome
from userdata.main_address import wait_for_main_address
from userdata.network import interface_to
from userdata.outputs import OUTPUTS, Snapshot, outputs, snapshot
from userdata.phase import PhaseReporter
from userdata.poweroff import power_off
from userdata.run_state import (
    completed,
    mark_complete,
    record_args,
    recorded_args,
    restore,
)
from userdata.spot import SpotWatcher

T = TypeVar("T")
TERMINATED = threading.Event()  # SIGTERM or SIGINT reached the agent
AGENT_STARTED = time.monotonic()
NOTICE_DECLARE_TIMEOUT = 10.0  # seconds the payload's signal may wait for the cluster's stop
FINAL_READS, FINAL_READ_DELAY = 3, 10.0  # looks at the stop as fabric run ends
FINAL_CONFIRM_DELAY = 2.0  # seconds before the second look that confirms "no stop"
INTERRUPT_GRACE = 90.0  # seconds a node's ranks get to checkpoint on a stop elsewhere
RUNNING: list[subprocess.Popen[bytes] | None] = [None]  # the fabric run now running
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
    parser.add_argument(
        "--members-parameter",
        default="",
        help="SSM parameter listing the cluster's instance ids by rank (CloudFormation's)",
    )
    parser.add_argument(
        "--stop-parameter",
        default="",
        help="SSM parameter where the first node that stops the cluster says why",
    )
    parser.add_argument(
        "--max-hours",
        type=float,
        default=0.0,
        help="the cost guard's power-off after this many hours (run-agent.sh schedules it): "
        "a stop then is recorded as max_hours, not as a failure",
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
    parser.add_argument(
        "--efa-rdma",
        action="store_true",
        help="the instance type's EFA device has RDMA (p4d, p5, ...): GPUDirect RDMA on",
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
        help="seconds between looks at the cluster's stop parameter (jittered)",
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


def resolve(
    args: argparse.Namespace, identity: NodeIdentity, ssm
) -> tuple[list[str], dict[str, str]]:
    main_address = wait_for_main_address(
        ssm,
        args.main_address_parameter,
        args.main_address_timeout,
        members_parameter=args.members_parameter,
        instance=identity.instance_id,
        rank=identity.node_rank,
        log=log,
    )
    if identity.node_rank == 0 and main_address != identity.private_ip:
        raise AgentError(
            f"parameter {args.main_address_parameter} says {main_address}, but this node 0 "
            f"has {identity.private_ip}"
        )
    interface = interface_to(main_address)
    log(f"network: gloo and NCCL bind {interface} to reach the main node {main_address}")
    environment = fabric_environment(
        interface=interface,
        accelerator=args.accelerator,
        threads=threads_per_process(usable_cores(), args.devices_per_node),
        rendezvous_timeout=args.rendezvous_timeout,
        run_dir=args.run_dir or None,
        efa=args.efa,
        efa_rdma=args.efa_rdma,
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
    watch: StopWatch | None = None,
) -> int:
    """Runs fabric run in the project folder (as the manual procedure's `cd`), with the venv's
    bin first on PATH, its output streamed as it comes."""
    env = {**os.environ, **environment}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    clear(Path(env[STATUS_DIR_ENV]))
    process = subprocess.Popen(command, env=env, cwd=workdir or None)
    RUNNING[0] = process
    if watcher:
        watcher.attach(process.pid)
    if watch and (watch.replaced or (watch.stop_seen and watch.stop_seen.state == FAILED)):
        process.terminate()  # the cluster failed (or moved on) while this one started
    if TERMINATED.is_set():
        process.terminate()
    try:
        return process.wait()
    finally:
        RUNNING[0] = None


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to this fabric run if it still runs (never to a pid that may be reused)."""
    if process is not None and process is RUNNING[0] and process.poll() is None:
        process.terminate()


def on_stop_signal(control: ClusterControl | None, max_hours: float) -> None:
    """SIGTERM or SIGINT, for all of train(): stopped from outside (systemctl stop, max_hours'
    shutdown, a terminated instance). The cluster's stop is written before fabric run is told,
    so that node 0 never takes the stop for the end of the run; then no restart and no
    power-off of our own."""

    def forward(signum: int, _frame: object) -> None:
        if TERMINATED.is_set():
            return
        TERMINATED.set()
        if control:
            declare_bounded(control, INTERRUPTED, stopped_from_outside(max_hours))
        if RUNNING[0] is not None:
            RUNNING[0].send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)


def run_state(action: Callable[[], T], uri: str) -> T:
    """The run's state in S3, read once before training: unreadable is one clear line."""
    try:
        return action()
    except (BotoCoreError, ClientError, RetriesExceededError, OSError) as error:
        raise AgentError(f"cannot read the run's files in {uri}/: {error}") from None


def script_arguments(s3: object, args: argparse.Namespace) -> list[str]:
    """The deploy's script arguments; none given: the ones the run was started with."""
    if args.script_args:
        return list(args.script_args)
    recorded = recorded_args(s3, args.artifacts_uri)
    if recorded:
        log(f"run {args.run_name}: continued with its recorded arguments: {shlex.join(recorded)}")
    return recorded or []


def begin_run(s3: object, args: argparse.Namespace, given: bool) -> None:
    """Node 0, before training: the arguments given are the run's from now on."""
    if given and recorded_args(s3, args.artifacts_uri) != args.script_args:
        record_args(s3, args.artifacts_uri, args.script_args)


@dataclass
class KeptOutputs:
    """Node 0: what the script writes by relative path in the project folder (not what
    shipped), kept with the run under outputs/ (userdata/outputs.py)."""

    workdir: Path
    before: Snapshot
    sync: ArtifactSync

    @classmethod
    def start(cls, s3: object, args: argparse.Namespace) -> KeptOutputs | None:
        if not args.workdir:
            return None
        workdir = Path(args.workdir)
        before = snapshot(workdir)
        uri = f"{args.artifacts_uri}/{OUTPUTS}"

        def files() -> list[Path]:
            return outputs(workdir, before).files

        kept = cls(workdir, before, ArtifactSync(s3, uri, workdir, args.sync_interval, files=files))
        kept.sync.start()
        return kept

    def finish(self, interrupted: bool) -> None:
        uploaded = self.sync.stop_now() if interrupted else f"{self.sync.stop()} file(s) uploaded"
        skipped = outputs(self.workdir, self.before).skipped
        if skipped:
            log(f"outputs: left out {len(skipped)} file(s): {'; '.join(skipped[:5])}")
        log(f"outputs (what the script wrote in {self.workdir}): {uploaded}")


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


@dataclass
class Records:
    """Where this node says what happened: its own phase and, for the whole cluster, the stop."""

    phase: PhaseReporter
    control: ClusterControl | None = None

    def record(self, phase: str) -> None:
        self.phase.record(phase)

    def fail(self, reason: str) -> None:
        """The cluster's stop first (the other nodes stop sooner), then this node's phase."""
        if self.control:
            self.control.declare(FAILED, reason)
        self.phase.record(f"failed: {reason}")

    def silence_if_replaced(self) -> None:
        """A node of an older deploy (CloudFormation makes the new nodes before it deletes the
        old ones) writes nothing more: the phase parameter is the new node's now."""
        if self.control and not self.control.is_member():
            self.phase.silenced = "another instance holds this rank now (a redeploy)"


def cluster_control(
    ssm: object, args: argparse.Namespace, identity: NodeIdentity
) -> ClusterControl | None:
    """This node's view of the cluster-wide parameters, where the stack names them."""
    if not (args.stop_parameter and args.members_parameter):
        return None
    return ClusterControl(
        ssm,
        args.members_parameter,
        args.stop_parameter,
        identity.node_rank,
        identity.instance_id,
        log,
    )


class PeerFailed(AgentError):
    """Another node failed the cluster: recorded in this node's phase, the stop is theirs."""


def stopped_from_outside(max_hours: float) -> str:
    """What SIGTERM meant: run-agent.sh schedules the max_hours power-off when the unit starts."""
    hours = (time.monotonic() - AGENT_STARTED) / 3600
    if max_hours and hours >= max_hours - 2 / 60:
        return f"max_hours={max_hours:g} reached: the node powers off (cost guard)"
    return "stopped from outside (SIGTERM: systemctl stop, a shutdown or a terminated instance)"


def declare_bounded(control: ClusterControl, state: str, reason: str) -> None:
    """The cluster's stop, written before the payload is told to stop; bounded, so that a
    throttled SSM does not eat a spot notice's two minutes (the write goes on meanwhile)."""
    writer = threading.Thread(target=control.declare, args=(state, reason), daemon=True)
    writer.start()
    writer.join(NOTICE_DECLARE_TIMEOUT)


def declare_notice(control: ClusterControl | None, notice: str) -> None:
    """Node 0, which gets no notice of its own, must not take the stop for the end of the run."""
    if control is not None:
        declare_bounded(control, INTERRUPTED, f"spot instance-action {notice}")


def final_stop(control: ClusterControl | None) -> Stop | None:
    """The cluster's stop as fabric run ends; AgentError when SSM cannot say (after its own
    retries): a run is never called complete on a guess."""
    if control is None:
        return None
    for attempt in range(FINAL_READS):
        try:
            stop = control.read_stop()
        except (BotoCoreError, ClientError) as error:
            if attempt == FINAL_READS - 1:
                raise AgentError(
                    f"cannot tell whether the cluster was stopped ({error}); the run is not "
                    "marked complete"
                ) from None
            time.sleep(FINAL_READ_DELAY)
            continue
        if stop is not None or attempt == 1:
            return stop
        # No stop: once more, a moment later. Parameter Store promises no read-after-write
        # consistency, and a peer's stop may have been written just before its script ended.
        time.sleep(FINAL_CONFIRM_DELAY)
    return None


def train(args: argparse.Namespace, records: Records) -> int:
    reporter = records.phase
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
        reporter.instance = identity.instance_id
    control = None if args.dry_run else cluster_control(ssm, args, identity)
    records.control = control
    if args.accelerator == "gpu":
        reporter.record("waiting-for-gpus")
        gpus = wait_for_gpus(args.devices_per_node, args.gpu_timeout, log=log)
        log(f"nvidia-smi sees {gpus} GPU(s)")
    s3 = aws_client("s3", identity.region, max(args.ssm_timeout, 30.0))
    given = bool(args.script_args)
    if args.artifacts_uri and not args.dry_run:
        args.script_args = run_state(lambda: script_arguments(s3, args), args.artifacts_uri)
        marker = run_state(
            lambda: completed(s3, args.artifacts_uri, args.run_fingerprint, args.script_args),
            args.artifacts_uri,
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
    sync = kept = None
    if identity.node_rank == 0 and args.artifacts_uri and args.run_dir:
        reporter.record("restoring")
        restored = run_state(
            lambda: restore(s3, args.artifacts_uri, Path(args.run_dir)), args.artifacts_uri
        )
        started = f"training ({restored.describe()})"
        log(f"run {args.run_name}: {restored.describe()} ({args.artifacts_uri}/)")
        run_state(lambda: begin_run(s3, args, given), args.artifacts_uri)
        sync = ArtifactSync(
            s3, args.artifacts_uri, Path(args.run_dir), args.sync_interval, PROGRESS_INTERVAL
        )
        sync.mark_seen(restored.paths)  # in S3 already
        sync.start()
        kept = KeptOutputs.start(s3, args)
    on_stop_signal(control, args.max_hours)
    log(f"running: {shlex.join(command)}")
    watcher = SpotWatcher(
        imds, args.spot_poll_interval, log, on_notice=lambda notice: declare_notice(control, notice)
    )
    watcher.start()
    watch = None
    if control and identity.num_nodes > 1:

        def on_stop(stop: Stop | None) -> None:
            running = RUNNING[0]
            if stop is None or stop.state == FAILED:  # None: this node was replaced
                terminate(running)
            elif not watcher.signal_payload():  # stopped on request elsewhere
                terminate(running)  # no worker to ask (a rendezvous, or no handler)
            else:  # this node's ranks checkpoint as well, within the grace
                timer = threading.Timer(INTERRUPT_GRACE, terminate, args=(running,))
                timer.daemon = True
                timer.start()

        watch = StopWatch(control, args.peer_poll_interval, on_stop, log)
        watch.start()
    # Where the ranks say how their script ended: this node's own disk, one run at a time.
    environment[STATUS_DIR_ENV] = tempfile.mkdtemp(prefix="fabric-launch-")
    status, failure = supervise(
        command, environment, args, reporter, watcher, watch, control, started
    )
    shutil.rmtree(environment[STATUS_DIR_ENV], ignore_errors=True)
    watcher.stop()
    if watch:
        watch.stop()
    if watch and watch.replaced:
        # A redeploy replaced this node: its run is the new cluster's now; nothing more here.
        for each in (sync, kept and kept.sync):
            if each:
                each.abandon()
        reporter.silenced = "another instance holds this rank now (a redeploy)"
        log("this node was replaced by a redeploy: no upload, no phase")
        return 0
    # A spot notice here or a stop from outside: the upload first, no more looks at SSM.
    stop = None if TERMINATED.is_set() or watcher.notice else final_stop(control)
    interrupted = TERMINATED.is_set() or watcher.notice or (stop and stop.state == INTERRUPTED)
    upload = ""
    if sync:
        if interrupted:
            upload = sync.stop_now()
            log(f"artifacts: {upload}")
        else:
            log(f"artifacts: {sync.stop()} file(s) uploaded to {args.artifacts_uri} at the end")
    if kept:
        kept.finish(bool(interrupted))
    suffix = f"; {upload}" if upload else ""
    if watcher.notice:
        # Not a failure: the payload checkpointed; a new run resumes from there.
        reporter.record(f"interrupted: spot instance-action {watcher.notice}{suffix}")
        return 0
    if TERMINATED.is_set():
        records.silence_if_replaced()
        reporter.record(f"interrupted: {stopped_from_outside(args.max_hours)}{suffix}")
        return 0
    if stop and stop.instance != identity.instance_id:
        if stop.state == FAILED:
            raise PeerFailed(stop.describe())
        reporter.record(f"interrupted: {stop.describe()}{suffix}")
        return 0
    if status != 0:
        raise AgentError(failure)
    if sync:
        try:
            mark_complete(
                s3, args.artifacts_uri, args.run_name, args.run_fingerprint, args.script_args
            )
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
    watch: StopWatch | None = None,
    control: ClusterControl | None = None,
    started: str = "training",
) -> tuple[int, str]:
    """Runs fabric run, again after a failure (a peer died: every node fails and restarts, and
    the payload resumes from its newest checkpoint), at most --max-restarts times; never again
    once the cluster is stopped (a failed node, a spot notice anywhere, a stop from outside),
    and never after a script error. A run whose ranks all finished their script has ended
    well, whatever the exit status (an abort at interpreter exit).

    Returns the exit status and, when this node failed, why (for its phase)."""
    folder = Path(environment[STATUS_DIR_ENV])
    for attempt in range(args.max_restarts + 1):
        reporter.record(started if attempt == 0 else f"training (restart {attempt})")
        status = run_fabric(command, environment, watcher, args.workdir, watch)
        if status == 0:
            return 0, ""
        ended = outcome(folder, args.devices_per_node)
        if ended.finished:
            log(f"fabric run exited with status {status} after every rank finished: done")
            return 0, ""
        said = f" ({ended.error})" if ended.error else ""
        failure = f"fabric run exited with status {status}{said}"
        if stopped(watcher, watch, control):
            return status, failure
        if ended.script_error:
            log(f"the script failed before its first training step: no restart ({failure})")
            return status, f"script: {ended.script_error}"
        if attempt == args.max_restarts:
            restarts = f" after {args.max_restarts} restart(s)" if args.max_restarts else ""
            return status, f"fabric run exited with status {status}{restarts}{said}"
        log(f"{failure}: restart {attempt + 1} of {args.max_restarts} in {args.restart_delay:g} s")
        time.sleep(args.restart_delay)
    return status, failure


def stopped(
    watcher: SpotWatcher | None, watch: StopWatch | None, control: ClusterControl | None
) -> bool:
    """Whether the cluster has stopped; one look at SSM before a restart, because a peer that
    was reclaimed said so before it went, and a restart would wait for it in the rendezvous."""
    if TERMINATED.is_set() or (watcher and watcher.notice) or (watch and watch.stop_seen):
        return True
    try:
        return control is not None and control.read_stop() is not None
    except (BotoCoreError, ClientError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records = Records(PhaseReporter(None, None))
    status = 1
    try:
        status = train(args, records)
    except PeerFailed as error:
        records.silence_if_replaced()
        records.record(f"failed: {error}")
    except AgentError as error:
        # Before the rank is known there is no parameter to record the failure in: say so.
        reporter = records.phase
        unrecorded = bool(args.phase_parameter) and not args.dry_run and not reporter.parameter
        note = f" ({NO_PHASE_RECORDED})" if unrecorded else ""
        print(f"error: {error}{note}", file=sys.stderr, flush=True)
        records.silence_if_replaced()
        records.fail(str(error))
    except Exception as error:  # a bug or an AWS error nobody foresaw: still failed, still off
        traceback.print_exc()
        records.fail(f"{type(error).__name__}: {error}")
    finally:
        # Whatever happened, a node that is done does not bill (unless stopped from outside).
        if args.stop_when_done and not TERMINATED.is_set():
            power_off(args.dry_run)
    return status


if __name__ == "__main__":
    sys.exit(main())
