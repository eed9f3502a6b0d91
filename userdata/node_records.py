"""Who this node is (IMDS) and where it says what happened: its phase and the cluster's stop.
Used by the agent and by `python -m userdata.report`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from userdata.agent_log import log
from userdata.cluster_control import FAILED, ClusterControl
from userdata.errors import AgentError
from userdata.imds import Imds, NodeIdentity, read_identity
from userdata.phase import PhaseReporter


def identify(imds: Imds) -> NodeIdentity:
    """read_identity, whose failures name the instance when IMDS can say which it is.

    A rank that cannot be read leaves no phase (its parameter is named by the rank): the
    error line in the journal and the console output is then all a user gets.
    """
    instance_id = imds.require("instance-id")
    try:
        return read_identity(imds)
    except AgentError as error:
        raise AgentError(f"{instance_id}: {error}") from None


@dataclass
class Records:
    """Where this node says what happened: its own phase and, for the whole cluster, the stop."""

    phase: PhaseReporter
    control: ClusterControl | None = None

    def record(self, phase: str) -> None:
        self.phase.record(phase)

    def fail(self, reason: str) -> None:
        """The cluster's stop first (the other nodes stop sooner), then this node's phase; a
        secret's value masked in both (the reason may quote the script's error)."""
        reason = self.phase.masker.mask(reason)
        if self.control:
            self.control.declare(FAILED, reason)
        self.phase.record(f"failed: {reason}")

    def silence_if_replaced(self) -> None:
        """A node of an older deploy (CloudFormation makes the new nodes before it deletes the
        old ones) writes nothing more: the phase parameter is the new node's now."""
        if self.control and not self.control.is_member():
            self.phase.silenced = "another instance holds this rank now (a redeploy)"


def cluster_control(
    ssm: object, args: argparse.Namespace, identity: NodeIdentity
) -> ClusterControl | None:
    """This node's view of the cluster-wide parameters, where the stack names them."""
    if not (args.stop_parameter and args.members_parameter):
        return None
    return ClusterControl(
        ssm,
        args.members_parameter,
        args.stop_parameter,
        identity.node_rank,
        identity.instance_id,
        log,
    )
