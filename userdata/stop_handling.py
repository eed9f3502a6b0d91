"""How the agent stops: SIGTERM or SIGINT from outside (TERMINATED, passed on to the fabric run
now running), the cluster's stop written before the payload is told, and the cluster's stop
read as fabric run ends."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from botocore.exceptions import BotoCoreError, ClientError

from userdata.cluster_control import INTERRUPTED, SPOT_REASON, ClusterControl, Stop
from userdata.errors import AgentError

TERMINATED = threading.Event()  # SIGTERM or SIGINT reached the agent
AGENT_STARTED = time.monotonic()
NOTICE_DECLARE_TIMEOUT = 10.0  # seconds the payload's signal may wait for the cluster's stop
FINAL_READS, FINAL_READ_DELAY = 3, 10.0  # looks at the stop as fabric run ends
FINAL_CONFIRM_DELAY = 2.0  # seconds before the second look that confirms "no stop"
RUNNING: list[subprocess.Popen[bytes] | None] = [None]  # the fabric run now running


# recover: this node handed its instance back to its group (a spot notice): no power-off and no
# scaling to zero, the group replaces it.
GAVE_WAY = threading.Event()


def terminate(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to this fabric run if it still runs (never to a pid that may be reused)."""
    if process is not None and process is RUNNING[0] and process.poll() is None:
        process.terminate()


def on_stop_signal(control: ClusterControl | None, max_hours: float) -> None:
    """SIGTERM or SIGINT, for all of train(): stopped from outside (systemctl stop, max_hours'
    shutdown, a terminated instance). The cluster's stop is written before fabric run is told,
    so that node 0 never takes the stop for the end of the run; then no restart and no
    power-off of our own."""

    def forward(signum: int, _frame: object) -> None:
        if TERMINATED.is_set():
            return
        TERMINATED.set()
        if control:
            declare_bounded(control, INTERRUPTED, stopped_from_outside(max_hours))
        if RUNNING[0] is not None:
            RUNNING[0].send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)


class PeerFailed(AgentError):
    """Another node failed the cluster: recorded in this node's phase, the stop is theirs."""


def stopped_from_outside(max_hours: float) -> str:
    """What SIGTERM meant: run-agent.sh schedules the max_hours power-off when the unit starts."""
    hours = (time.monotonic() - AGENT_STARTED) / 3600
    if max_hours and hours >= max_hours - 2 / 60:
        return f"max_hours={max_hours:g} reached: the node powers off (cost guard)"
    return "stopped from outside (SIGTERM: systemctl stop, a shutdown or a terminated instance)"


def declare_bounded(control: ClusterControl, state: str, reason: str) -> None:
    """The cluster's stop, written before the payload is told to stop; bounded, so that a
    throttled SSM does not eat a spot notice's two minutes (the write goes on meanwhile)."""
    writer = threading.Thread(target=control.declare, args=(state, reason), daemon=True)
    writer.start()
    writer.join(NOTICE_DECLARE_TIMEOUT)


def declare_notice(control: ClusterControl | None, notice: str) -> None:
    """Node 0, which gets no notice of its own, must not take the stop for the end of the run."""
    if control is not None:
        declare_bounded(control, INTERRUPTED, f"{SPOT_REASON} {notice}")


def final_stop(control: ClusterControl | None) -> Stop | None:
    """The cluster's stop as fabric run ends; AgentError when SSM cannot say (after its own
    retries): a run is never called complete on a guess."""
    if control is None:
        return None
    for attempt in range(FINAL_READS):
        try:
            stop = control.read_stop()
        except (BotoCoreError, ClientError) as error:
            if attempt == FINAL_READS - 1:
                raise AgentError(
                    f"cannot tell whether the cluster was stopped ({error}); the run is not "
                    "marked complete"
                ) from None
            time.sleep(FINAL_READ_DELAY)
            continue
        if stop is not None or attempt == 1:
            return stop
        # No stop: once more, a moment later. Parameter Store promises no read-after-write
        # consistency, and a peer's stop may have been written just before its script ended.
        time.sleep(FINAL_CONFIRM_DELAY)
    return None
