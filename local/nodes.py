"""The local cluster's nodes: each a `fabric run` in its own process group on 127.0.0.1, started
with its rank's command, its output prefixed with its rank, watched until all end well or one
fails, and stopped with every worker it started."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from local.process_groups import stop_groups
from userdata.fabric_command import (
    fabric_environment,
    fabric_run_command,
    threads_per_process,
    usable_cores,
)
from userdata.launch import STATUS_DIR_ENV
from userdata.launch_status import clear, outcome

MAIN_ADDRESS = "127.0.0.1"


def fabric_run(python: str) -> tuple[str, ...]:
    """`fabric run` of a given python: a GPU machine's python3 may have no `fabric` beside it."""
    return (python, "-m", "lightning.fabric.cli")


class Node:
    """One node: a `fabric run` in its own process group, its output prefixed with its rank."""

    def __init__(
        self, rank: int, command: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> None:
        self.rank = rank
        self.status_dir = Path(env[STATUS_DIR_ENV])
        self.muted = threading.Event()  # after Ctrl-C: the nodes' dying words are not shown
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that stopping a node stops its workers too
        )
        assert self.process.stdout is not None
        self._relay = threading.Thread(
            target=self._prefix, args=(self.process.stdout,), daemon=True
        )
        self._relay.start()

    def _prefix(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            if self.muted.is_set():
                continue
            sys.stdout.write(f"[node {self.rank}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    def finish(self) -> None:
        self._relay.join(timeout=5)

    def ended_well(self, devices: int) -> bool:
        """Exit 0, or every rank finished its script and the exit came after (an abort at
        interpreter exit must not restart a run that is done)."""
        status = self.process.poll()
        return status == 0 or (status is not None and outcome(self.status_dir, devices).finished)


def stat_fields(pid: str | int) -> list[str]:
    """/proc/PID/stat after the command's ")": state, ppid, ..., [19] the start time."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def descendants(pids: Sequence[int]) -> list[tuple[int, str]]:
    """Every live descendant of these processes, with its start time (a pid can be reused)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: only the process groups are stopped
        return []
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        started[int(entry.name)] = fields[19]
    found: list[tuple[int, str]] = []
    parents = list(pids)
    while parents:
        for child in children.get(parents.pop(), []):
            found.append((child, started[child]))
            parents.append(child)
    return found


def kill_leftovers(processes: list[tuple[int, str]]) -> None:
    for pid, started in processes:
        try:
            if stat_fields(pid)[19] == started:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):
            continue  # gone already


def stop_all(nodes: list[Node]) -> None:
    # torchrun starts each worker in a session of its own, out of its node's process group:
    # a worker that does not die of SIGTERM (a frozen one, SIGSTOP or hung) would outlive its
    # killed node, and hold the node's output pipe open. So its descendants are killed too.
    workers = descendants([node.process.pid for node in nodes if node.process.poll() is None])
    stop_groups([node.process for node in nodes])
    kill_leftovers(workers)
    for node in nodes:
        node.finish()


def start_nodes(args: argparse.Namespace, port: int, nodes: list[Node], status_root: Path) -> None:
    """Appends each node as it starts, so an interrupt can stop the ones already running."""
    processes = args.num_nodes * args.devices_per_node
    env = {
        **os.environ,
        **fabric_environment(
            interface="lo",
            accelerator=args.accelerator,
            # One machine hosts every process of every node.
            threads=args.threads_per_process or threads_per_process(usable_cores(), processes),
            rendezvous_timeout=args.rendezvous_timeout,
            run_dir=args.run_dir,
        ),
        "PATH": f"{Path(args.python).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **args.script_env,
    }
    ranks = range(args.num_nodes) if args.main_first else reversed(range(args.num_nodes))
    for rank in ranks:  # by default the main node last, on purpose
        command = fabric_run_command(
            node_rank=rank,
            main_address=MAIN_ADDRESS,
            main_port=port,
            accelerator=args.accelerator,
            devices=args.devices_per_node,
            num_nodes=args.num_nodes,
            script=args.script,
            script_args=args.script_args,
            precision=args.precision,
            launcher=fabric_run(args.python),
        )
        if rank == 0 and args.main_node_delay:
            print(f"[cluster] node 0 starts in {args.main_node_delay:g} s", flush=True)
            time.sleep(args.main_node_delay)
        print(f"[cluster] starting node {rank}: {shlex.join(command)}", flush=True)
        status_dir = status_root / f"node-{rank}"  # a disk of its own, as on EC2
        clear(status_dir)
        nodes.append(Node(rank, command, {**env, STATUS_DIR_ENV: str(status_dir)}, args.workdir))


def wait_for_nodes(nodes: list[Node], devices: int) -> Node | None:
    """Waits until all nodes end well (None) or one fails (that node)."""
    running = list(nodes)
    while running:
        for node in list(running):
            status = node.process.poll()
            if status is None:
                continue
            running.remove(node)
            if not node.ended_well(devices):
                return node
            if status != 0:
                print(
                    f"[cluster] node {node.rank} exited with status {status} after every rank "
                    "finished its script: done",
                    flush=True,
                )
        time.sleep(0.2)
    return None


def script_error(nodes: list[Node], devices: int) -> str:
    """The first node's script error (a failure before the first training step), or ""."""
    for node in sorted(nodes, key=lambda node: node.rank):
        error = outcome(node.status_dir, devices).script_error
        if error:
            return f"node {node.rank}: script: {error}"
    return ""
