"""Training on this node: the `fabric run` command (main address, interface, threads), run and
started again after a failure until the cluster stops, then the uploads and the phase that
say how it ended."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from userdata.agent_log import log
from userdata.artifacts import ArtifactSync
from userdata.aws_clients import aws_client
from userdata.cluster_control import (
    FAILED,
    INTERRUPTED,
    ClusterControl,
    Stop,
    StopWatch,
    is_spot_notice,
)
from userdata.data_channels import CONNECTIONS, CopyStopped, copy_channels, data_dir_variable
from userdata.errors import AgentError
from userdata.fabric_command import (
    fabric_environment,
    fabric_run_command,
    threads_per_process,
    usable_cores,
)
from userdata.generations import Follower, Generation
from userdata.gpus import wait_for_gpus
from userdata.imds import Imds, NodeIdentity
from userdata.launch import STATUS_DIR_ENV
from userdata.launch_status import clear, outcome
from userdata.main_address import wait_for_main_address
from userdata.masking import Masker, mask_own_output, start_pump
from userdata.network import interface_to
from userdata.node_groups import GroupWatch, give_way, publish_generation
from userdata.node_records import Records, cluster_control, identify
from userdata.phase import PhaseReporter
from userdata.run_files import KeptOutputs, begin_run, run_state, script_arguments
from userdata.run_inputs import DATA_DIR_ENV, RunInputs
from userdata.run_state import completed, mark_complete, restore
from userdata.secret_values import read_secrets
from userdata.spot import SpotWatcher
from userdata.stop_handling import (
    GAVE_WAY,
    RUNNING,
    TERMINATED,
    PeerFailed,
    declare_notice,
    final_stop,
    on_stop_signal,
    stopped_from_outside,
    terminate,
)

INTERRUPT_GRACE = 90.0  # seconds a node's ranks get to checkpoint on a stop elsewhere
# recover: the members moved on to a new generation (a node replaced) while fabric run ran.
GENERATION_MOVED = threading.Event()
PROGRESS_INTERVAL = 15.0  # seconds between uploads of the script's progress.json
PUMP_DRAIN_SECONDS = 10.0  # for the masked output's last lines once fabric run has ended
# A node's copy of the data channels at its slowest (a replaced node's empty disk): below gp3's
# 125 MiB/s baseline, which the copy reaches (bench/results.md, section 8).
SLOWEST_COPY_BYTES_PER_S = 50 * 1024**2
PEER_LOOK_SECONDS = 30.0


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


def secret_variables(
    args: argparse.Namespace, inputs: RunInputs, identity: NodeIdentity, reporter: PhaseReporter
) -> dict[str, str]:
    """env and the secrets, read now (a missing one fails the node before anything else) and
    masked from here on. A dry run reads none."""
    given = dict(inputs.env)
    if inputs.secrets and not args.dry_run:
        reporter.record("reading-secrets")
        values = read_secrets(inputs.secrets, identity.region, args.ssm_timeout)
        reporter.masker.add(values.values())
        mask_own_output(reporter.masker)
        given.update(values)
        log(f"secrets: {', '.join(values)} read, handed to the script only")
    return given


def data_variables(
    args: argparse.Namespace,
    inputs: RunInputs,
    s3,
    reporter: PhaseReporter,
    stop: Callable[[], str | None],
) -> dict[str, str]:
    """$FABRIC_DATA_DIR, once the data channels are on this node's own disk; the rendezvous
    bound grows by the time a node with an empty disk (a replaced one) takes to copy them.
    A dry run copies nothing. A stop of this node or of the cluster meanwhile ends the copy
    (CopyStopped)."""
    if not inputs.data:
        return {}
    data_dir = Path(args.data_dir)
    if not args.dry_run:
        s3 = aws_client("s3", s3.meta.region_name, 30.0, CONNECTIONS)  # one per copy thread
        copied = copy_channels(s3, inputs.data, data_dir, reporter.record, stop=stop)
        log(f"data: {copied.describe()} in {data_dir}")
        longest = int(copied.total / SLOWEST_COPY_BYTES_PER_S)
        if longest > 0:
            args.rendezvous_timeout += longest
            log(
                f"data: the rendezvous waits up to {args.rendezvous_timeout} s, {longest} s "
                "more for a peer that copies it all"
            )
        reporter.record("waiting-for-main")
    return {DATA_DIR_ENV: data_dir_variable(data_dir, inputs.data)}


class StopLook:
    """Why a data copy should stop: SIGTERM here, or the cluster's stop written by another
    node (read at most every PEER_LOOK_SECONDS: Parameter Store's throughput is shared)."""

    def __init__(self, control: ClusterControl | None, max_hours: float) -> None:
        self.control = control
        self.max_hours = max_hours
        self.looked = time.monotonic()
        self.stop: Stop | None = None

    def __call__(self) -> str | None:
        if TERMINATED.is_set():
            return stopped_from_outside(self.max_hours)
        if self.control is None or time.monotonic() - self.looked < PEER_LOOK_SECONDS:
            return None
        self.looked = time.monotonic()
        try:
            stop = self.control.read_stop()
        except (BotoCoreError, ClientError):
            return None  # a missed look: the next one, or the rendezvous, tells
        if stop is not None and stop.instance != self.control.instance:
            self.stop = stop
            return stop.describe()
        return None


def copy_stopped(stopped: CopyStopped, look: StopLook, reporter: PhaseReporter) -> int:
    """The data copy ended by a stop: this node's (interrupted) or another node's."""
    log(f"data: the copy stopped: {stopped}; what is whole stays for the next start")
    if not TERMINATED.is_set() and look.stop is not None and look.stop.state == FAILED:
        raise PeerFailed(str(stopped))
    reporter.record(f"interrupted: {stopped}")
    return 0


def run_fabric(
    command: list[str],
    environment: dict[str, str],
    watcher: SpotWatcher | None = None,
    workdir: str = "",
    watch: StopWatch | None = None,
    masker: Masker | None = None,
) -> int:
    """Runs fabric run in the project folder (as the manual procedure's `cd`), with the venv's
    bin first on PATH, its output streamed as it comes: through the agent, the secrets' values
    masked, when there are secrets."""
    env = {**os.environ, **environment}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    clear(Path(env[STATUS_DIR_ENV]))
    piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if masker else {}
    process = subprocess.Popen(command, env=env, cwd=workdir or None, **piped)
    pump = start_pump(process.stdout, sys.stdout.fileno(), masker) if masker else None
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
        if pump:  # a grandchild that keeps the pipe open must not hold the agent here
            pump.join(PUMP_DRAIN_SECONDS)


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
    inputs = RunInputs.read(args.inputs)
    given_to_script = secret_variables(args, inputs, identity, reporter)
    reporter.record("waiting-for-main")
    autoscaling = None
    if args.recover and not args.dry_run:
        autoscaling = aws_client("autoscaling", identity.region, args.ssm_timeout)
    if autoscaling and identity.node_rank == 0:
        publish_generation(
            ssm,
            autoscaling,
            cluster=args.recover,
            num_nodes=identity.num_nodes,
            instance=identity.instance_id,
            private_ip=identity.private_ip,
            main_address_parameter=args.main_address_parameter,
            members_parameter=args.members_parameter,
            timeout=args.capacity_wait_minutes * 60,
            log=log,
        )
    # After node 0 has published (recover): the others wait for its address, not its copy.
    on_stop_signal(control, args.max_hours)
    look = StopLook(control, args.max_hours)
    try:
        given_to_script.update(data_variables(args, inputs, s3, reporter, look))
    except CopyStopped as stopped:
        return copy_stopped(stopped, look, reporter)
    command, environment = resolve(args, identity, ssm)
    environment.update(given_to_script)
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

        follower, on_generation = None, None
        if args.recover and control.is_member() and control.generation:
            follower = Follower(identity.node_rank, identity.instance_id, control.generation)

            def on_generation(_generation: Generation) -> None:
                GENERATION_MOVED.set()
                terminate(RUNNING[0])

        watch = StopWatch(control, args.peer_poll_interval, on_stop, log, follower, on_generation)
        watch.start()
    groups = None
    if autoscaling and identity.node_rank == 0 and control and control.generation:
        groups = GroupWatch(
            ssm,
            autoscaling,
            cluster=args.recover,
            num_nodes=identity.num_nodes,
            instance=identity.instance_id,
            members_parameter=args.members_parameter,
            generation=control.generation,
            interval=args.peer_poll_interval,
            log=log,
        )
        groups.start()
    # Where the ranks say how their script ended: this node's own disk, one run at a time.
    environment[STATUS_DIR_ENV] = tempfile.mkdtemp(prefix="fabric-launch-")
    status, failure = supervise(
        command,
        environment,
        args,
        reporter,
        watcher,
        watch,
        control,
        started,
        rejoin=(lambda: resolve(args, identity, ssm)) if args.recover else None,
    )
    shutil.rmtree(environment[STATUS_DIR_ENV], ignore_errors=True)
    if groups:
        groups.stop()
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
        if autoscaling and give_way(autoscaling, identity.instance_id, log):
            GAVE_WAY.set()  # the group replaces this node: no power-off, no scaling to zero
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
    rejoin: Callable[[], tuple[list[str], dict[str, str]]] | None = None,
) -> tuple[int, str]:
    """Runs fabric run, again after a failure (a peer died: every node fails and restarts, and
    the payload resumes from its newest checkpoint), at most --max-restarts times; never again
    once the cluster is stopped (a failed node, a spot notice anywhere, a stop from outside),
    and never after a script error. A run whose ranks all finished their script has ended
    well, whatever the exit status (an abort at interpreter exit).

    recover: a new generation (a node replaced) stops fabric run and starts it again once the
    generation is complete, with its main address (rejoin), up to --max-replacements times;
    such a start is not a restart.

    Returns the exit status and, when this node failed, why (for its phase)."""
    folder = Path(environment[STATUS_DIR_ENV])
    attempt = replacements = 0
    label = started
    while True:
        if GENERATION_MOVED.is_set() and rejoin:
            GENERATION_MOVED.clear()
            replacements += 1
            if replacements > args.max_replacements:
                return 1, (
                    f"more than max_replacements={args.max_replacements} replacements in this run"
                )
            reporter.record("waiting-for-main")
            command, fresh = rejoin()  # once the generation is complete: its main address
            environment.update(fresh)
            number = control.generation.number if control and control.generation else "?"
            label = f"training (generation {number})"
            log(f"generation {number}: running: {shlex.join(command)}")
        reporter.record(label)
        status = run_fabric(command, environment, watcher, args.workdir, watch, reporter.masker)
        if GENERATION_MOVED.is_set() and rejoin and not stopped(watcher, watch, control):
            continue  # stopped for the new generation, not failed
        notice = cluster_stop(watch, control) if rejoin and watch else None
        if is_spot_notice(notice) and not own_stop(watcher) and watch and notice:
            # recover: the noticed node's group replaces it; the cluster goes on after.
            reporter.record(f"waiting: {notice.describe()}; its group replaces it")
            if not GENERATION_MOVED.wait(args.capacity_wait_minutes * 60):
                return 1, (
                    f"{notice.describe()}: no replacement within capacity_wait_minutes="
                    f"{args.capacity_wait_minutes:g}"
                )
            watch.stop_seen = None
            continue
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
        attempt += 1
        log(f"{failure}: restart {attempt} of {args.max_restarts} in {args.restart_delay:g} s")
        time.sleep(args.restart_delay)
        label = f"training (restart {attempt})"


def cluster_stop(watch: StopWatch | None, control: ClusterControl | None) -> Stop | None:
    """The stop in force: as the watch saw it, else one look (fabric run may end, a peer gone,
    before the watch's next look)."""
    if watch and watch.stop_seen:
        return watch.stop_seen
    try:
        return control.read_stop() if control else None
    except (BotoCoreError, ClientError):
        return None


def own_stop(watcher: SpotWatcher | None) -> bool:
    """This node got the notice itself, or was stopped from outside: it does not go on."""
    return TERMINATED.is_set() or bool(watcher and watcher.notice)


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
