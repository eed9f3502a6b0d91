"""Booting emulated nodes: the install environment, the namespaces, each node's IMDS stub and
AWS forwarder, its real user data, and the spot notice its stub serves."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from local.project_venv import project_venv, torch_source, uv_binary
from rehearsal.emulated_aws import CREDENTIAL_ENV, EmulatedAws, EmulatedInstance
from rehearsal.imds_stub import node_values
from rehearsal.namespaces import EmulatedNetwork
from rehearsal.processes import NodeProcesses, run_environment
from rehearsal.report import Manifest, RehearsalError, log
from stacks.config import PROJECT_DIR
from training_project.load import load_project
from training_project.torch_pins import pinned_version

IMDS_PORT = 1338


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
    slots: dict[int, int] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Each node's IMDS stub serves a spot notice once spot_notice_file(folder, rank) exists.
    slots: the namespace of a node that replaces one (rank -> slot past the ranks)."""
    slots = slots or {}
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
    shared = folder / "shared"  # each node's disk is its own home; this one they all mount
    shared.mkdir(exist_ok=True)
    boots = []
    for node in nodes:
        prefix = network.exec_prefix(slots.get(node.rank, node.rank))
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
            # shared_fs=efs: the cluster's file system, one folder every node of it sees.
            "FABRIC_REHEARSAL_SHARED_DIR": str(shared),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{aws.port}",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{IMDS_PORT}",
        }
        slot = slots.get(node.rank, node.rank)
        log(
            f"booting node {node.rank} ({node.instance_id}, {node.private_ip}) in "
            f"{network.node_namespace(slot)}"
        )
        boots.append(
            processes.start(
                [*network.exec_prefix(slot), "bash", str(script)],
                env=env,
                cpu=cpus[node.rank % len(cpus)],  # each node its own core, as on separate machines
                log_path=home / "console.log",
                prefix=f"[node {node.rank}] ",
            )
        )
    return list(reversed(boots))


def _first_line(process: subprocess.Popen[bytes], what: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line:
        raise RehearsalError(f"{what} did not start (exit status {process.poll()})")
    return line


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
    waited = list(boots)  # on_tick may put a replacement's boot in a node's place
    while not all(ended):
        if on_tick:
            on_tick()
        for rank, boot in enumerate(boots):
            if boot is not waited[rank]:
                waited[rank], ended[rank] = boot, 0.0
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


SPOT_NOTICE = '{"action": "terminate", "time": "2026-11-29T21:00:00Z"}'


def notice_once_training(folder: Path, rank: int) -> Callable[[], None]:
    """EC2 tells the reclaimed instance only: node `rank`'s IMDS serves the notice once node 0
    has trained a step."""

    sent: list[bool] = []

    def tick() -> None:
        notice = spot_notice_file(folder, rank)
        main_console = folder / "node-0" / "console.log"
        if sent or not main_console.exists():
            return
        if "first step done" in main_console.read_text(errors="replace"):
            notice.write_text(SPOT_NOTICE)
            sent.append(True)
            log(f"spot interruption notice to node {rank} (to it alone, as EC2 sends it)")

    return tick
