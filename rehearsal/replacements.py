"""A node lost without notice, as EC2 loses one (recover=true): once the run has a checkpoint,
the node's instance is terminated through the emulated EC2 (its group launches a replacement
with the same rank and a new address) and every process of the node is killed at once; then
the replacement boots in a namespace of its own, holding its new address."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rehearsal.emulated_aws import EmulatedAws, EmulatedInstance, stack_instances
from rehearsal.namespaces import EmulatedNetwork, processes_in
from rehearsal.processes import NodeProcesses
from rehearsal.report import RehearsalError, log


class NodeLoss:
    """Called on every tick of the wait for the boots; acts once."""

    def __init__(
        self,
        *,
        rank: int,
        aws: EmulatedAws,
        network: EmulatedNetwork,
        processes: NodeProcesses,
        folder: Path,
        config: Any,
        nodes: list[EmulatedInstance],
        boots: list[subprocess.Popen[bytes]],
        boot: Callable[..., list[subprocess.Popen[bytes]]],
    ) -> None:
        self.rank, self.aws, self.network, self.processes = rank, aws, network, processes
        self.folder, self.config, self.nodes, self.boots = folder, config, nodes, boots
        self.boot = boot  # boot_nodes with the deploy's own arguments bound
        self.lost: EmulatedInstance | None = None
        self.replacement: EmulatedInstance | None = None

    def checkpointed(self) -> bool:
        return any((self.folder / "shared" / "runs").glob("*/checkpoints/step-*.ckpt"))

    def __call__(self) -> None:
        if self.lost is not None or not self.checkpointed():
            return
        self.lost = self.nodes[self.rank]
        self.aws.client("ec2").terminate_instances(InstanceIds=[self.lost.instance_id])
        namespace = self.network.inodes[self.network.node_namespace(self.rank)]
        killed = processes_in({namespace})
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log(
            f"node {self.rank} ({self.lost.instance_id}, {self.lost.private_ip}) lost without "
            f"notice: its instance terminated, its {len(killed)} process(es) killed"
        )
        new = [
            node
            for node in stack_instances(self.aws, self.config.stack_name)
            if node.rank == self.rank and node.instance_id != self.lost.instance_id
        ]
        if len(new) != 1:
            raise RehearsalError(f"rank {self.rank}'s group launched {len(new)} replacement(s)")
        self.replacement = new[0]
        slot = len(self.network.inodes)  # past every namespace made so far
        self.network.add_node(slot, self.replacement.private_ip)
        home = self.folder / f"node-{self.rank}"
        home.rename(self.folder / f"node-{self.rank}-lost")
        (self.boots[self.rank],) = self.boot([self.replacement], slots={self.rank: slot})
        self.nodes[self.rank] = self.replacement
        log(
            f"its group's replacement {self.replacement.instance_id} "
            f"({self.replacement.private_ip}) boots as node {self.rank}"
        )
