"""A node replaced by its group (recover=true). Lost without notice, as EC2 loses one: once the
run has a checkpoint, the node's instance is terminated through the emulated EC2 and every
process of the node is killed at once. Or after a spot notice: the node hands its instance
back to its group itself. Either way the group launches a replacement with the same rank and
a new address, which boots in a namespace of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rehearsal.boots import spot_notice_file
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
        lose: bool = True,
    ) -> None:
        """lose: the rehearsal loses the node; else it waits for the node to give way."""
        self.rank, self.aws, self.network, self.processes = rank, aws, network, processes
        self.folder, self.config, self.nodes, self.boots = folder, config, nodes, boots
        self.boot = boot  # boot_nodes with the deploy's own arguments bound
        self.lose = lose
        self.lost: EmulatedInstance | None = None
        self.replacement: EmulatedInstance | None = None
        self.looked = 0.0

    def checkpointed(self) -> bool:
        return any((self.folder / "shared" / "runs").glob("*/checkpoints/step-*.ckpt"))

    def __call__(self) -> None:
        if self.replacement is not None:
            return
        if self.lose and self.lost is None:
            if not self.checkpointed():
                return
            self.lost = self.nodes[self.rank]
            self.aws.client("ec2").terminate_instances(InstanceIds=[self.lost.instance_id])
            killed = self.kill()
            log(
                f"node {self.rank} ({self.lost.instance_id}, {self.lost.private_ip}) lost "
                f"without notice: its instance terminated, its {killed} process(es) killed"
            )
        if time.monotonic() - self.looked < 1.0:  # the emulated AWS, once a second
            return
        self.looked = time.monotonic()
        old = self.nodes[self.rank]
        new = [
            node
            for node in stack_instances(self.aws, self.config.stack_name)
            if node.rank == self.rank and node.instance_id != old.instance_id
        ]
        if not new:
            return  # not given way yet (a notice), or the group has not launched one
        if len(new) != 1:
            raise RehearsalError(f"rank {self.rank}'s group launched {len(new)} replacement(s)")
        if self.lost is None:  # it gave way: what is left of it goes with its instance
            self.lost = old
            log(f"node {self.rank} ({old.instance_id}) gave its instance back to its group")
            self.kill()
        self.replacement = new[0]
        spot_notice_file(self.folder, self.rank).unlink(missing_ok=True)  # the old one's only
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

    def kill(self) -> int:
        """Every process in the node's namespace, at once (an instance that is gone)."""
        namespace = self.network.inodes[self.network.node_namespace(self.rank)]
        killed = processes_in({namespace})
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(killed)
