"""The `fabric run` command line and its environment: one definition for EC2 and local runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# What `fabric run --precision` accepts (Lightning 2.x), without its aliases.
PRECISIONS = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
# Where the Deep Learning AMI keeps libfabric and the aws-ofi-nccl plugin: a systemd service
# does not get the login shell's LD_LIBRARY_PATH, so NCCL would not find EFA without it.
EFA_LIBRARY_PATH = "/opt/amazon/ofi-nccl/lib:/opt/amazon/efa/lib"
# What `fabric run` starts on every rank, in front of the user's script (see launch.py).
LAUNCH_SCRIPT = Path(__file__).resolve().with_name("launch.py")


def script_target(script: str) -> list[str]:
    """A script's path, or a module as `-m pkg.module` (the script setting's two forms)."""
    return script.split() if script.startswith("-m ") else [script]


def launched(script: str, script_args: Sequence[str]) -> list[str]:
    """`fabric run`'s SCRIPT and SCRIPT_ARGS: the launcher, then after `--` (so that no argument
    of the script is taken for one of fabric run's own, such as --precision) the script's."""
    return [str(LAUNCH_SCRIPT), "--", *script_target(script), *script_args]


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
    precision: str | None = None,
    launcher: Sequence[str] = ("fabric", "run"),
) -> list[str]:
    """launcher: how `fabric run` is called, e.g. `python -m lightning.fabric.cli` where the
    `fabric` script is not beside the python that should run it."""
    return [
        *launcher,
        f"--node-rank={node_rank}",
        f"--main-address={main_address}",
        f"--main-port={main_port}",
        f"--accelerator={accelerator}",
        f"--devices={devices}",
        f"--num-nodes={num_nodes}",
        *([f"--precision={precision}"] if precision else []),
        *launched(script, script_args),
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
    efa: bool = False,
    efa_rdma: bool = False,
) -> dict[str, str]:
    """efa_rdma: only where the instance type's EFA device has RDMA (fi_efa(7): otherwise the
    setting aborts the application)."""
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
            # "=": exactly this interface (NCCL takes a bare name as a prefix: ens5 matches ens50).
            env["NCCL_SOCKET_IFNAME"] = f"={interface}"
    if run_dir:
        env["FABRIC_RUN_DIR"] = run_dir
    if efa:
        inherited = os.environ.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = EFA_LIBRARY_PATH + (f":{inherited}" if inherited else "")
        env["FI_PROVIDER"] = "efa"  # fail rather than fall back to TCP sockets quietly
        if efa_rdma:
            env["FI_EFA_USE_DEVICE_RDMA"] = "1"  # GPUDirect RDMA on p4d/p5
    return env
