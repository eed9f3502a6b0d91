"""Checks on what a deployment's nodes did: their phases in SSM, the interfaces they bind,
their artifacts in S3, and the same result as a local-cluster run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from rehearsal.emulated_aws import EmulatedAws, EmulatedInstance
from rehearsal.processes import run_environment
from rehearsal.report import RehearsalError, log
from stacks.config import PROJECT_DIR
from userdata.phase import decode_phase
from userdata.run_layout import checkpoint_of

EXAMPLE_PROJECT = PROJECT_DIR / "trainer"


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
        inputs = config.inputs
        expected = [
            "installing",
            *(["reading-secrets"] if inputs.secrets else []),
            "waiting-for-main",
            *(["waiting-for-main"] if inputs.data else []),  # again, once its copy is whole
            *(["restoring"] if node.rank == 0 else []),
        ]
        steps = [t for t in recorded if not t.startswith(("training", "data: "))]
        copied = [t for t in recorded if t.startswith("data: ")]
        if (
            steps[: len(expected)] != expected
            or recorded[-1] != "done"
            or not any(text.startswith("training") for text in recorded)
            or (inputs.data and not _whole(copied))
        ):
            raise RehearsalError(f"node {node.rank} recorded the phases {recorded}")
    check_socket_interfaces(folder, nodes)
    check_run_directory(folder, config, nodes)
    bucket, prefix = outputs["ArtifactsBucket"], f"{config.stack_name}/{outputs['RunName']}"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    # A file each, or a folder of shards (sharded checkpoints): one entry per checkpoint.
    checkpoints = {
        name
        for key in keys
        if (name := checkpoint_of(PurePosixPath(key.removeprefix(f"{prefix}/"))))
    }
    if not checkpoints or f"{prefix}/summary.json" not in keys:
        raise RehearsalError(f"artifacts missing in s3://{bucket}/{prefix}/: {keys}")
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/summary.json")["Body"].read())
    expected = config.num_nodes * config.devices_per_node
    if summary["world_size"] != expected:
        raise RehearsalError(f"world size {summary['world_size']}, expected {expected}")
    for node in nodes:
        console = (folder / f"node-{node.rank}" / "console.log").read_text()
        if config.stop_when_done and final_stop(config, node.rank) not in console:
            raise RehearsalError(f"node {node.rank} did not record its final stop")
    log(
        f"every node done; world size {summary['world_size']}; {len(checkpoints)} checkpoint(s) "
        f"and the summary in s3://{bucket}/{prefix}/"
    )
    return summary


def final_stop(config: Any, rank: int) -> str:
    """What a node whose run is over says last (stop_when_done): it would power off, or
    (recover) it scaled its group to zero, which terminates it."""
    if config.recover:
        return "scaled to zero: it terminates, nothing replaces it"
    return "would stop now"


def check_run_directory(folder: Path, config: Any, nodes: list[EmulatedInstance]) -> None:
    """shared_fs=efs: every node mounted the cluster's one folder (its disk holds no run) and
    the run's files are there; none: each node's run is on its own disk."""
    shared = folder / "shared" / "runs"  # a folder per run in it
    on_disks = [n.rank for n in nodes if (folder / f"node-{n.rank}" / "fabric" / "run").exists()]
    if config.shared_fs == "efs":
        for node in nodes:
            console = (folder / f"node-{node.rank}" / "console.log").read_text()
            if f"phase sharedfs: REHEARSAL: {folder / 'shared'} stands for fs-" not in console:
                raise RehearsalError(f"node {node.rank} did not mount the shared run directory")
        if on_disks or not any(path.is_file() for path in shared.rglob("*")):
            raise RehearsalError(f"the run is not (only) in {shared}: on the disks of {on_disks}")
        log(f"every node's run directory is the cluster's shared one ({shared})")
    elif len(on_disks) != len(nodes) or shared.exists():
        raise RehearsalError(f"shared_fs=none, but the run directories are {on_disks}, {shared}")


def phase_of(ssm: Any, config: Any, node: EmulatedInstance) -> str:
    """The node's phase as the console reads it: written by this instance (or the stack)."""
    value = ssm.get_parameter(Name=config.phase_parameter(node.rank))["Parameter"]["Value"]
    phase = decode_phase(value)
    if phase.instance not in (None, node.instance_id):
        raise RehearsalError(f"node {node.rank}'s phase was written by {phase.instance}")
    return phase.text


def _whole(progress: list[str]) -> bool:
    """The data phases end with all of it: `data: 0.1 of 0.1 GB`."""
    if not progress:
        return False
    done, _, total = progress[-1].removeprefix("data: ").removesuffix(" GB").partition(" of ")
    return done == total


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


def local_cluster_summary(
    folder: Path, config: Any, run_id: str, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """extra: the local cluster's own options (the same data as the cluster's channel)."""
    run_dir = folder / "local-run"
    if config.project == EXAMPLE_PROJECT:  # this venv, as `make local` runs it
        project = ["--script", (EXAMPLE_PROJECT / config.script).relative_to(PROJECT_DIR)]
    else:  # the venv that the rehearsal installed it into
        project = ["--project", config.project, "--script", config.script]
    command = [
        sys.executable, "-m", "local.cluster", *map(str, project),
        "--num-nodes", str(config.num_nodes), "--devices-per-node", str(config.devices_per_node),
        "--run-dir", str(run_dir), *extra, "--", *config.script_args,
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
