"""The `fabric run` command line and its environment: one definition for EC2 and local runs."""

from __future__ import annotations

import os
from collections.abc import Sequence


def fabric_run_command(
    *,
    node_rank: int,
    main_address: str,
    main_port: int,
    accelerator: str,
    devices: int,
    num_nodes: int,
    script: str,
    script_args: Sequence[str] = (),
) -> list[str]:
    return [
        "fabric",
        "run",
        f"--node-rank={node_rank}",
        f"--main-address={main_address}",
        f"--main-port={main_port}",
        f"--accelerator={accelerator}",
        f"--devices={devices}",
        f"--num-nodes={num_nodes}",
        script,
        *script_args,
    ]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def threads_per_process(cores: int, processes: int) -> int:
    """fabric run would give each process all cores; oversubscribed CPUs train many times slower."""
    return max(1, cores // max(1, processes))


def fabric_environment(
    *,
    interface: str | None,
    accelerator: str,
    threads: int,
    rendezvous_timeout: int,
    run_dir: str | None = None,
) -> dict[str, str]:
    """What the agent sets on top of the inherited environment."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        # torchrun waits 2 x 900 s for a main node that never comes unless this bounds it.
        "PET_RDZV_CONF": f"timeout={rendezvous_timeout}",
        "PYTHONUNBUFFERED": "1",
    }
    if interface:
        # Otherwise gloo binds the hostname's address (127.0.1.1 on Ubuntu) or a bridge.
        env["GLOO_SOCKET_IFNAME"] = interface
        if accelerator != "cpu":
            env["NCCL_SOCKET_IFNAME"] = interface
    if run_dir:
        env["FABRIC_RUN_DIR"] = run_dir
    return env
