"""`status`: the nodes (instance state, phase) and the run (progress, ETA), and a verdict:
failed (exit 1), stopped (exit 1: interrupted, or no node running), complete (exit 0), in
progress (exit 0); `--watch` until it is decided.

A rank's phase is the one written by the instance that holds the rank now (see
`aws.read_phases`): during a redeploy an old node's `failed:` or `done` is not this run's."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import click
from botocore.exceptions import ClientError

from console import (
    NO_VALUE,
    format_duration,
    format_number,
    format_pairs,
    format_table,
    parse_time,
    utc_now,
)
from console.aws import (
    Aws,
    NodePhase,
    Stack,
    instance_states,
    list_objects,
    previous_version,
    read_json,
    read_phases,
)
from stacks.config import members_parameter, phase_parameter_template
from userdata.generations import Generation
from userdata.phase import decode_phase
from userdata.run_layout import COMPLETE_MARKER, PROGRESS_FILE

CLEAR_SCREEN = "\x1b[H\x1b[2J"
# States in which an instance will do nothing more for the run (a missing id: terminated
# long ago, or replaced).
NOT_RUNNING = {"stopping", "stopped", "shutting-down", "terminated", "gone"}
RATE_WINDOW = timedelta(minutes=10)  # a step rate over the recent past, not the whole run


@dataclass(frozen=True)
class NodeRow:
    rank: int
    instance_id: str
    state: str  # EC2's, or "gone" when EC2 no longer knows the id
    phase: str | None
    since: datetime | None
    note: str = ""  # another instance's phase (an old node during a redeploy)


@dataclass(frozen=True)
class Progress:
    """progress.json, the script's optional report: every field may be missing."""

    step: int | None
    total: int | None
    loss: float | None
    samples_per_s: float | None
    updated: datetime | None
    samples_per_step: float | None = None  # optional: lets samples/s give an ETA alone

    @classmethod
    def from_json(cls, data: dict[str, Any], fallback_time: datetime | None = None) -> Progress:
        return cls(
            step=_integer(data.get("step")),
            total=_integer(data.get("total_steps")),
            loss=_real(data.get("loss")),
            samples_per_s=_real(data.get("samples_per_s")),
            updated=parse_time(data.get("updated")) or fallback_time,
            samples_per_step=_real(data.get("samples_per_step")),
        )


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _real(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass
class StepHistory:
    """Observations of (time, step) for a step rate: from the watch's earlier looks, or the
    previous S3 version of progress.json. A step that goes back (a restart resumed from an
    older checkpoint) starts the history again."""

    points: list[tuple[datetime, int]] = field(default_factory=list)

    def add(self, progress: Progress | None) -> None:
        if progress is None or progress.updated is None or progress.step is None:
            return
        point = (progress.updated, progress.step)
        if self.points and point[1] < self.points[-1][1]:
            self.points.clear()
        if not self.points or point[0] > self.points[-1][0]:
            self.points.append(point)
        elif point[0] < self.points[0][0] and point[1] <= self.points[0][1]:
            self.points.insert(0, point)  # an older observation (a previous version)
        newest = self.points[-1][0]
        while len(self.points) > 2 and newest - self.points[1][0] >= RATE_WINDOW:
            self.points.pop(0)

    def rate(self) -> float | None:
        """Steps per second, or None without two observations with progress between them."""
        if len(self.points) < 2:
            return None
        (first_time, first_step), (last_time, last_step) = self.points[0], self.points[-1]
        seconds = (last_time - first_time).total_seconds()
        if seconds <= 0 or last_step <= first_step:
            return None
        return (last_step - first_step) / seconds


@dataclass(frozen=True)
class Verdict:
    state: str  # "failed", "complete", "stopped" or "in progress"
    rank: int | None = None
    reason: str = ""

    @property
    def decided(self) -> bool:
        return self.state != "in progress"

    @property
    def exit_code(self) -> int:
        return 1 if self.state in ("failed", "stopped") else 0


def is_done(phase: str | None) -> bool:
    return phase is not None and (phase == "done" or phase.startswith("done:"))


def judge(nodes: list[NodeRow], marker: bool) -> Verdict:
    """A failed node decides first (the others may wait for it forever); then an interrupted
    one (a spot reclaim: the run stopped, resumable from its newest checkpoint, and never
    complete); then completion (every node done, or node 0's completion marker); then whether
    any node can still work."""
    for node in nodes:
        if node.phase and node.phase.startswith("failed:"):
            return Verdict("failed", node.rank, node.phase.removeprefix("failed:").strip())
    for node in nodes:
        if node.phase and node.phase.startswith("interrupted:"):
            return Verdict("stopped", node.rank, node.phase)
    if marker or (nodes and all(is_done(node.phase) for node in nodes)):
        return Verdict("complete")
    if nodes and all(node.state in NOT_RUNNING for node in nodes):
        phases = "; ".join(f"node {node.rank}: {node.phase or 'no phase'}" for node in nodes)
        return Verdict("stopped", reason=phases)
    return Verdict("in progress")


@dataclass(frozen=True)
class Snapshot:
    """Everything a status screen shows, read at one moment."""

    stack: str
    region: str
    bucket: str
    run: str
    nodes: list[NodeRow]
    progress: Progress | None
    summary: dict[str, Any] | None
    marker: bool  # fabric-run.json: node 0's agent saw the run complete
    step_rate: float | None
    now: datetime
    generation: str = ""  # recover: the members' generation, and the replacements it took

    @property
    def verdict(self) -> Verdict:
        return judge(self.nodes, self.marker)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.stack}/{self.run}/"


def format_nodes(nodes: list[NodeRow], now: datetime) -> str:
    rows = [
        [
            str(node.rank),
            node.instance_id or NO_VALUE,
            node.state,
            (node.phase or "(no phase yet)") + (f" ({node.note})" if node.note else ""),
            format_duration((now - node.since).total_seconds()) if node.since else NO_VALUE,
        ]
        for node in nodes
    ]
    return format_table(["rank", "instance", "state", "phase", "in phase"], rows)


def training_elapsed(snapshot: Snapshot) -> float | None:
    """Since the earliest node entered training; for a finished run, the script's own
    train_time_s when its summary has one."""
    starts = [
        node.since
        for node in snapshot.nodes
        if node.since and (node.phase or "").startswith("training")
    ]
    if starts:
        return (snapshot.now - min(starts)).total_seconds()
    train_time = (snapshot.summary or {}).get("train_time_s")
    return _real(train_time)


def eta_seconds(progress: Progress | None, step_rate: float | None) -> float | None:
    if progress is None or progress.step is None or progress.total is None:
        return None
    remaining = progress.total - progress.step
    if remaining <= 0:
        return 0.0
    if step_rate:
        return remaining / step_rate
    if progress.samples_per_s and progress.samples_per_step:
        return remaining * progress.samples_per_step / progress.samples_per_s
    return None


def format_run(snapshot: Snapshot) -> str:
    progress, summary = snapshot.progress, snapshot.summary or {}
    # summary.json is written last, at the end: its numbers win over progress.json's.
    step = _integer(summary.get("steps"))
    step = step if step is not None else (progress.step if progress else None)
    total = progress.total if progress else None
    loss = _real(summary.get("final_loss"))
    loss = loss if loss is not None else (progress.loss if progress else None)
    rate = _real(summary.get("samples_per_s"))
    rate = rate if rate is not None else (progress.samples_per_s if progress else None)

    if step is None:
        step_text = NO_VALUE
    elif total:
        step_text = f"{step} / {total} ({100 * step / total:.0f}%)"
    else:
        step_text = str(step)
    finished = snapshot.verdict.state == "complete"
    eta = None if finished else eta_seconds(progress, snapshot.step_rate)
    if progress is None:
        updated = "no progress.json (the script does not write one)"
    elif progress.updated is None:
        updated = "progress.json has no time"
    else:
        ago = format_duration((snapshot.now - progress.updated).total_seconds())
        updated = f"updated {ago} ago"
    rows = [
        ["step", step_text],
        ["loss", format_number(loss)],
        ["samples/s", format_number(rate, 1)],
        ["elapsed", format_duration(training_elapsed(snapshot))],
        ["ETA", format_duration(eta)],
        ["progress", updated],
    ]
    return f"run {snapshot.run} ({snapshot.location})\n" + format_pairs(rows, indent="  ")


def format_verdict(snapshot: Snapshot) -> str:
    verdict, run = snapshot.verdict, snapshot.run
    if verdict.state == "failed":
        return f"run {run}: FAILED — node {verdict.rank}: {verdict.reason}"
    if verdict.state == "complete":
        return (
            f"run {run}: complete — results in {snapshot.location}; download them with "
            f"python -m console results --stack {snapshot.stack}"
        )
    if verdict.state == "stopped" and verdict.rank is not None:
        return (
            f"run {run}: stopped before completing — node {verdict.rank}: {verdict.reason} "
            "(resumable: deploy again to continue from the newest checkpoint)"
        )
    if verdict.state == "stopped":
        return f"run {run}: stopped before completing, no node is running ({verdict.reason})"
    return f"run {run}: in progress"


def format_status(snapshot: Snapshot) -> str:
    return "\n\n".join(
        [
            f"stack {snapshot.stack} ({snapshot.region}), {len(snapshot.nodes)} node(s)"
            + (f"; {snapshot.generation}" if snapshot.generation else "")
            + "\n"
            + format_nodes(snapshot.nodes, snapshot.now),
            format_run(snapshot),
            format_verdict(snapshot),
        ]
    )


def collect(aws: Aws, stack: Stack, history: StepHistory) -> Snapshot:
    """One look at AWS: phases, instance states, the run's files; history gains the newest
    progress (and, on a first look, the one before it from S3's previous version)."""
    instance_ids = stack.instance_ids
    phases: list[NodePhase] = read_phases(aws, stack.name, instance_ids)
    states = instance_states(aws, instance_ids)
    nodes = [
        NodeRow(
            rank=phase.rank,
            instance_id=instance_ids[phase.rank],
            state=states.get(instance_ids[phase.rank], "gone"),
            phase=phase.phase,
            since=phase.since,
            note=phase.note,
        )
        for phase in phases
    ]
    bucket, run = stack.bucket, stack.run
    prefix = f"{stack.name}/{run}/"
    # One listing tells which of the small files exist before reading any of them.
    modified = {
        item.key[len(prefix) :]: item.modified for item in list_objects(aws, bucket, prefix)
    }
    progress = None
    if PROGRESS_FILE in modified:
        data = read_json(aws, bucket, prefix + PROGRESS_FILE)
        if data is not None:
            progress = Progress.from_json(data, modified[PROGRESS_FILE])
            if not history.points and (
                before := previous_version(aws, bucket, prefix + PROGRESS_FILE)
            ):
                earlier = read_json(aws, bucket, prefix + PROGRESS_FILE, before[0])
                if earlier:
                    history.add(Progress.from_json(earlier, before[1]))
            history.add(progress)
    summary = (
        read_json(aws, bucket, prefix + "summary.json") if "summary.json" in modified else None
    )
    marker = COMPLETE_MARKER in modified
    fingerprint = stack.outputs.get("RunFingerprint")
    if marker and fingerprint:
        # The run named again with other training (more epochs, new code) goes on.
        found = read_json(aws, bucket, prefix + COMPLETE_MARKER) or {}
        marker = found.get("fingerprint", fingerprint) == fingerprint
    return Snapshot(
        stack=stack.name,
        region=stack.region,
        bucket=bucket,
        run=run,
        nodes=nodes,
        progress=progress,
        summary=summary,
        marker=marker,
        step_rate=history.rate(),
        now=utc_now(),
        generation=describe_generation(aws, stack),
    )


def describe_generation(aws: Aws, stack: Stack) -> str:
    """recover: which generation the cluster trains in, how many replacements it took, and the
    last one: which ranks, and how long from node 0 seeing it to node 0 training again. ""
    for a cluster of instances."""
    if "Node0Group" not in stack.outputs:
        return ""
    ssm = aws.client("ssm")
    try:
        versions = [
            (generation, version.get("LastModifiedDate"))
            for page in ssm.get_paginator("get_parameter_history").paginate(
                Name=members_parameter(stack.name)
            )
            for version in page.get("Parameters", [])
            if (generation := Generation.decode(str(version.get("Value", "")))) is not None
        ]
    except ClientError:
        return "generation unknown"
    if not versions:
        return "generation not published yet (node 0 is booting)"
    current = versions[-1][0]
    complete = [index for index, (generation, _) in enumerate(versions) if generation.complete]
    text = f"generation {current.number}"
    if not current.complete:
        text += ", pending: a replacement is launching"
    if len(complete) < 2:
        return text
    before, last = versions[complete[-2]][0], versions[complete[-1]][0]
    ranks = [rank for rank, member in enumerate(last.members) if member != before.members[rank]]
    seen = versions[complete[-2] + 1][1]  # the first generation after the one before
    text += f" ({len(complete) - 1} replacement(s); last: rank(s) {ranks} replaced"
    phase = phase_parameter_template(stack.name).format(rank=0)
    resumed = holder_phase_time(aws, phase, f"training (generation {last.number})")
    if seen and resumed:
        text += f", training again {format_duration((resumed - seen).total_seconds())} later"
    return text + ")"


def holder_phase_time(aws: Aws, name: str, text: str) -> datetime | None:
    """When a phase parameter last said `text` (its history; None if never, or unreadable)."""
    found = None
    try:
        for page in aws.client("ssm").get_paginator("get_parameter_history").paginate(Name=name):
            for version in page.get("Parameters", []):
                if decode_phase(str(version.get("Value", ""))).text == text:
                    found = version.get("LastModifiedDate")
    except ClientError:
        return None
    return found


def watch(
    look: Callable[[], Snapshot],
    interval: float,
    show: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    clear: bool = False,
) -> int:
    """Redraws until the run is decided (its exit code) or Ctrl-C (130)."""
    try:
        while True:
            snapshot = look()
            text = format_status(snapshot)
            if snapshot.verdict.decided:
                show((CLEAR_SCREEN if clear else "") + text)
                return snapshot.verdict.exit_code
            show(f"{CLEAR_SCREEN if clear else ''}{text}\n(every {interval:g}s; Ctrl-C to stop)")
            sleep(interval)
    except KeyboardInterrupt:
        return 130


def run_status(aws: Aws, stack: Stack, watch_it: bool, interval: float) -> int:
    history = StepHistory()

    def look() -> Snapshot:
        return collect(aws, stack, history)

    if watch_it:
        clear = sys.stdout.isatty()
        return watch(look, interval, click.echo, clear=clear)
    snapshot = look()
    click.echo(format_status(snapshot))
    return snapshot.verdict.exit_code
