"""The scenarios a rehearsal plays on its deployments: a training checked against a local
cluster, runs watched and resumed, a failed node, a spot interruption."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from rehearsal.boots import SPOT_NOTICE, install_here, spot_notice_file
from rehearsal.checks import (
    check_socket_interfaces,
    check_training,
    local_cluster_summary,
    phase_of,
    same_result,
)
from rehearsal.deployments import Deployment, Rehearsal, agent_output, check_main_address
from rehearsal.emulated_aws import CREDENTIAL_ENV, REGION, stack_groups
from rehearsal.inputs import RehearsalInputs, check_inputs
from rehearsal.processes import run_environment
from rehearsal.report import Manifest, Phases, RehearsalError, log
from stacks.config import PROJECT_DIR
from userdata.generations import Generation
from userdata.run_layout import COMPLETE_MARKER, checkpoint_of


def rehearse(
    args: argparse.Namespace, folder: Path, phases: Phases, run_id: str, manifest: Manifest
) -> None:
    rehearsal = Rehearsal(args, folder, phases, run_id, manifest)
    try:
        rehearsal.installs = phases.run("install the project here", lambda: install_here(args))
        inputs = None
        if args.inputs:
            inputs = phases.run(
                "data, a variable and a secret",
                lambda: RehearsalInputs.create(rehearsal.aws, folder, run_id),
            )
        first = rehearsal.deploy(
            "the settings given",
            spot_node=args.spot_node,
            lose_node=args.lose_node,
            **(inputs.settings if inputs else {}),
        )
        if args.spot_node is not None and not args.recover:
            phases.run("check the interruption", lambda: check_interrupted(rehearsal, first))
            rehearsal.destroy(first)
            check_resumed(rehearsal, first)
            return
        if args.fail_node is not None:
            phases.run("check the failure", lambda: check_failed_node(rehearsal, first))
            rehearsal.destroy(first)
            return
        if args.max_replacements == 0:
            phases.run("check it gave up", lambda: check_gave_up(rehearsal, first))
            rehearsal.destroy(first)
            return
        summary = phases.run(
            "check phases and artifacts",
            lambda: check_training(
                rehearsal.aws, first.config, first.outputs, first.folder, first.nodes
            ),
        )
        if inputs:
            phases.run(
                "check the inputs", lambda: check_run_inputs(rehearsal, first, summary, inputs)
            )
        if args.restarted:
            phases.run("check the restart", lambda: check_restarted(first, summary))
        if args.recover:
            phases.run("check the groups", lambda: check_groups(rehearsal, first))
        if rehearsal.loss is not None:
            phases.run("check the replacement", lambda: check_replaced(rehearsal, first, summary))
        if args.train_on:
            rehearsal.destroy(first)
            check_every_rank_resumed(rehearsal, first, summary)
            return
        local = phases.run(
            "local cluster, same settings",
            lambda: local_cluster_summary(
                folder, first.config, run_id, inputs.local_args if inputs else ()
            ),
        )
        log(f"the same result as the local cluster, bit for bit ({same_result(summary, local)})")
        if args.runs:
            phases.run("watch it: status, logs, results", lambda: check_console(rehearsal, first))
        rehearsal.destroy(first)
        if args.runs:
            check_runs(rehearsal, first, summary)
    finally:
        rehearsal.close()


def check_run_inputs(
    rehearsal: Rehearsal, deployment: Deployment, summary: dict[str, Any], inputs: RehearsalInputs
) -> None:
    stack = deployment.config.stack_name
    shown = "".join(
        result.stdout + result.stderr
        for result in (
            console(rehearsal, "status", "--stack", stack),
            console(rehearsal, "logs", "--stack", stack),
        )
    )
    check_inputs(
        inputs,
        rehearsal.aws,
        rehearsal.network,
        deployment.folder,
        rehearsal.folder,
        deployment.nodes,
        summary,
        deployment.outputs["LogGroup"],
        shown,
    )


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
    if not any(checkpoint_of(PurePosixPath(name)) for name in names):
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


def check_groups(rehearsal: Rehearsal, deployment: Deployment) -> None:
    """recover: node 0 published its address and the first generation (the instances of the
    ranks' groups), and every node whose run was over left its group: each group at zero, its
    instance terminated, none replaced."""
    config, nodes, aws = deployment.config, deployment.nodes, rehearsal.aws
    check_main_address(aws, config, nodes[0])
    members = aws.client("ssm").get_parameter(Name=config.members_parameter)["Parameter"]["Value"]
    generation = Generation.decode(members)
    expected = tuple(node.instance_id for node in nodes)
    if generation is None or generation.members != expected:
        raise RehearsalError(f"{config.members_parameter} is {members!r}, not of {expected}")
    groups = stack_groups(aws, config.stack_name)
    if config.stop_when_done and any(
        group["DesiredCapacity"] != 0 or group.get("Instances") for group in groups
    ):
        raise RehearsalError(f"a group still holds an instance after the run: {groups}")
    log(
        f"node 0 published {nodes[0].private_ip} and generation {generation.number} "
        f"({members}); all {len(groups)} group(s) at zero after the run"
    )


def check_replaced(rehearsal: Rehearsal, deployment: Deployment, summary: dict[str, Any]) -> None:
    """A node replaced by its group (lost without notice, or given way after a spot notice):
    the replacement joined, the others followed the new generation (a new node 0: its new
    address), and the run went on, not from the start, to its end; where the script says so,
    every rank resumed from the same checkpoint with identical replicas."""
    loss = rehearsal.loss
    if loss is None or loss.lost is None or loss.replacement is None:
        raise RehearsalError("the run ended before a node was replaced: train longer")
    for node in deployment.nodes:
        said = agent_output(deployment, node.rank)
        if node.rank != loss.rank and "fabric run stops, to start again" not in said:
            raise RehearsalError(f"node {node.rank} did not follow the new generation")
    if summary["steps_this_run"] >= summary["steps"]:
        raise RehearsalError(f"the cluster trained from the start again: {summary}")
    starts = summary.get("resumed_from", [summary["steps"] - summary["steps_this_run"]])
    if len(set(starts)) != 1 or not summary.get("replicas_identical", True):
        raise RehearsalError(f"every rank should resume alike after the replacement: {summary}")
    how = "lost" if rehearsal.args.spot_node is None else "gave way after its spot notice"
    ranks = f"all {len(starts)} ranks" if "resumed_from" in summary else "the run"
    log(
        f"node {loss.rank} {how} ({loss.lost.instance_id}); its replacement "
        f"{loss.replacement.instance_id} ({loss.replacement.private_ip}) joined; {ranks} "
        f"resumed from step {starts[0]} and ended at {summary['steps']} with the same weights"
    )


def check_gave_up(rehearsal: Rehearsal, deployment: Deployment) -> None:
    """max_replacements=0: the first replacement fails the run with the reason, every node
    records it, and every group ends at zero (nothing left billing, nothing replaced)."""
    config, ssm = deployment.config, rehearsal.aws.client("ssm")
    reason = "more than max_replacements=0 replacements in this run"
    for node in deployment.nodes:
        phase = phase_of(ssm, config, node)
        if not phase.startswith("failed: ") or reason not in phase:
            raise RehearsalError(f"node {node.rank} recorded {phase!r}, not the reason")
    groups = stack_groups(rehearsal.aws, config.stack_name)
    if any(group["DesiredCapacity"] != 0 or group.get("Instances") for group in groups):
        raise RehearsalError(f"a group still holds an instance after giving up: {groups}")
    log(f"past max_replacements every node recorded {reason!r}; every group at zero")


def check_restarted(deployment: Deployment, summary: dict[str, Any]) -> None:
    """A node's ranks failed mid-run: every node restarted fabric run, and every rank (the
    other node's too) resumed from the same newest checkpoint, none from step 0."""
    for node in deployment.nodes:
        if "restart 1 of" not in agent_output(deployment, node.rank):
            raise RehearsalError(f"node {node.rank} did not restart its fabric run")
    starts = summary["resumed_from"]
    if len(set(starts)) != 1 or starts[0] == 0 or not summary["replicas_identical"]:
        raise RehearsalError(f"after the restart every rank should resume alike: {summary}")
    log(
        f"a node failed mid-run; every node restarted, all {len(starts)} ranks resumed from "
        f"step {starts[0]} and ended at {summary['steps']} with the same weights"
    )


def check_shards_in_s3(rehearsal: Rehearsal, deployment: Deployment) -> None:
    """A sharded checkpoint in S3 holds a shard of every rank (each node's) and its .metadata:
    from node 0's disk alone it would hold node 0's ranks' shards only."""
    config, outputs = deployment.config, deployment.outputs
    prefix = f"{config.stack_name}/{outputs['RunName']}/"
    pages = rehearsal.aws.client("s3").get_paginator("list_objects_v2")
    names = [
        PurePosixPath(item["Key"].removeprefix(prefix))
        for page in pages.paginate(Bucket=outputs["ArtifactsBucket"], Prefix=prefix)
        for item in page.get("Contents", [])
    ]
    folders: dict[str, set[str]] = {}
    for name in names:
        checkpoint = checkpoint_of(name)
        if checkpoint and name.parent.as_posix() == checkpoint:
            folders.setdefault(checkpoint, set()).add(name.name)
    world = config.num_nodes * config.devices_per_node
    for folder, files in sorted(folders.items()):
        ranks = {int(file.split("_")[2]) for file in files if file.endswith(".distcp")}
        if ".metadata" not in files or ranks != set(range(world)):
            raise RehearsalError(f"sharded checkpoint {folder} in S3 is not whole: {sorted(files)}")
    if not folders:
        raise RehearsalError(f"no sharded checkpoint in s3://.../{prefix}: {names}")
    log(f"{len(folders)} sharded checkpoint(s) in S3, each with the shards of all {world} ranks")


def check_every_rank_resumed(
    rehearsal: Rehearsal, first: Deployment, summary: dict[str, Any]
) -> None:
    """A new cluster trains the run on: every rank (each node's too) resumes from the step the
    first cluster ended at, and every replica ends with the same weights. With the run
    directory on node 0's disk only, node 1's ranks would start from step 0 (or, sharded,
    find node 1's shards missing in S3)."""
    run, bucket = first.outputs["RunName"], first.outputs["ArtifactsBucket"]
    if summary.get("sharded"):
        rehearsal.phases.run("check the shards in S3", lambda: check_shards_in_s3(rehearsal, first))
    more, total = train_on(rehearsal.args.script_args, summary["steps"])
    second = rehearsal.deploy(
        f"run {run} again, to train on, on a new cluster", run=run, script_args=shlex.join(more)
    )
    key = f"{first.config.stack_name}/{run}/summary.json"
    body = rehearsal.aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    resumed = json.loads(body)
    world = first.config.num_nodes * first.config.devices_per_node
    if resumed["resumed_from"] != [summary["steps"]] * world or resumed["steps"] != total:
        raise RehearsalError(
            f"every rank should resume from step {summary['steps']} and end at {total}: {resumed}"
        )
    if not resumed["replicas_identical"]:
        raise RehearsalError(f"the replicas differ after the resume: {resumed}")
    log(
        f"a new cluster resumed run {run} on all {world} ranks from step {summary['steps']} to "
        f"{total}; every replica ends with the same weights"
    )
    rehearsal.destroy(second)


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
