"""The cluster-wide state every node reads with one call: who the cluster is and whether it
has been stopped.

- members (`/fabric/<stack>/members`, written by CloudFormation once every node exists): the
  instance ids in rank order. During a redeploy CloudFormation runs the old and the new nodes
  side by side; a node, a phase or a stop whose instance is not there belongs to the other
  deploy and is ignored.
- stop (`/fabric/<stack>/stop`): the first node that stops the cluster writes why, once: a
  failure (`failed`) or a stop on request (`interrupted`: a spot notice, a stop from outside).
  A node whose own fabric run ended well still reads it before it calls the run complete: a
  spot notice reaches one instance only, and that node's script stops the whole cluster.

Every node reads one parameter pair per look instead of every peer's phase, so the control
plane's cost grows with N, not N squared (README: "What the control plane costs").
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from userdata.generations import Change, Follower, Generation

FAILED = "failed"
INTERRUPTED = "interrupted"
NO_STOP = "none"  # the stack's initial value of the stop parameter
BOOT_SLACK = 60.0  # seconds: clock steps at boot
MAX_REASON = 1000  # characters of a stop's reason: the value stays within SSM's 4096
DECLARE_ATTEMPTS = 4
JOIN_TIMEOUT = 5.0


def boot_time() -> float:
    """When this machine booted (epoch seconds), from /proc/uptime; 0 where there is none."""
    try:
        with open("/proc/uptime") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return datetime.now(UTC).timestamp() - uptime - BOOT_SLACK


@dataclass(frozen=True)
class Stop:
    state: str  # FAILED or INTERRUPTED
    rank: int
    instance: str
    reason: str

    def describe(self) -> str:
        return f"node {self.rank} {self.state} ({self.reason})"

    def encode(self) -> str:
        return json.dumps(
            {
                "state": self.state,
                "rank": self.rank,
                "instance": self.instance,
                "reason": self.reason,
            },
            ensure_ascii=False,  # SSM counts characters: an escape would be six
        )

    @classmethod
    def decode(cls, value: str) -> Stop | None:
        try:
            data = json.loads(value)
            stop = cls(
                str(data["state"]), int(data["rank"]), str(data["instance"]), str(data["reason"])
            )
        except (ValueError, TypeError, KeyError):
            return None  # the initial "none", or not ours
        return stop if stop.state in (FAILED, INTERRUPTED) else None


SPOT_REASON = "spot instance-action"  # how a spot notice's stop begins its reason


def is_spot_notice(stop: Stop | None) -> bool:
    """A stop that a spot notice on one node wrote: with recover, the others wait for its
    replacement instead of ending."""
    return stop is not None and stop.state == INTERRUPTED and stop.reason.startswith(SPOT_REASON)


def parse_members(value: str) -> list[str]:
    """The instance ids by rank of the generation in force (CloudFormation's list, or node 0's
    numbered one with recover); [] until node 0 publishes one."""
    generation = Generation.decode(value)
    return list(generation.members) if generation else []


class ClusterControl:
    """One node's view of the cluster-wide parameters (the stack makes both)."""

    def __init__(
        self,
        ssm: Any,
        members_parameter: str,
        stop_parameter: str,
        rank: int,
        instance: str,
        log: Callable[[str], None],
    ) -> None:
        self.ssm = ssm
        self.members_parameter = members_parameter
        self.stop_parameter = stop_parameter
        self.rank = rank
        self.instance = instance
        self.log = log
        self.booted = boot_time()
        self.members: list[str] | None = None  # as last read
        self.generation: Generation | None = None  # the members as last read, numbered

    def holds_rank(self) -> bool:
        """Whether the members, as last read, still give this instance its rank."""
        members = self.members
        return members is None or (self.rank < len(members) and members[self.rank] == self.instance)

    def _read(self) -> tuple[list[str] | None, dict[str, Any] | None]:
        """Members and the stop parameter, in one call."""
        answer = self.ssm.get_parameters(Names=[self.members_parameter, self.stop_parameter])
        found = {parameter["Name"]: parameter for parameter in answer.get("Parameters", [])}
        parameter = found.get(self.members_parameter)
        members = parse_members(parameter["Value"]) if parameter else []
        if parameter and members:
            self.generation = Generation.decode(parameter["Value"])
        if members:  # none yet (recover, before node 0 publishes): no instance is replaced
            self.members = members
        return (self.members if members else None), found.get(self.stop_parameter)

    def read_stop(self) -> Stop | None:
        """This cluster's stop, if a member wrote one since this machine booted (an older one is
        from before a stop/start of the instances, or from another deploy). Raises on AWS
        errors: the caller decides whether a missed look matters."""
        members, parameter = self._read()
        if parameter is None:
            return None
        stop = Stop.decode(parameter.get("Value", ""))
        if stop is None or not members or not 0 <= stop.rank < len(members):
            return None
        if members[stop.rank] != stop.instance:
            return None  # written by an instance of another deploy
        written = parameter.get("LastModifiedDate")
        if written is not None and written.timestamp() < self.booted:
            return None
        return stop

    def is_member(self) -> bool:
        """Whether this instance still holds its rank; True when that cannot be told."""
        try:
            self._read()
        except (BotoCoreError, ClientError):
            return True
        return self.holds_rank()

    def declare(self, state: str, reason: str) -> Stop | None:
        """Stops the cluster unless one of its nodes already has: the first writer's reason
        stays (a read before the write; two nodes failing in the same instant may both write,
        and either reason is true). Returns the stop in force, or None where it could not be
        written (this node is no longer a member, or SSM refused after its retries)."""
        stop = Stop(state, self.rank, self.instance, " ".join(reason.split())[:MAX_REASON])
        for attempt in range(DECLARE_ATTEMPTS):
            try:
                current = self.read_stop()
                if current is not None:
                    return current  # the first writer's (or, after a clash, the one in force)
                if not self.holds_rank():
                    self.log("not stopping the cluster: another instance holds this rank now")
                    return None
                self.ssm.put_parameter(
                    Name=self.stop_parameter, Value=stop.encode(), Type="String", Overwrite=True
                )
                break
            except ClientError as error:
                # Two nodes writing at once: SSM refuses one, which reads the stop in force.
                code = error.response.get("Error", {}).get("Code")
                if code == "TooManyUpdates" and attempt < DECLARE_ATTEMPTS - 1:
                    time.sleep(random.uniform(0.2, 1.0))
                    continue
                self.log(f"could not record the cluster's stop in {self.stop_parameter}: {error}")
                return None
            except BotoCoreError as error:
                self.log(f"could not record the cluster's stop in {self.stop_parameter}: {error}")
                return None
        self.log(f"cluster stopped: {stop.describe()}")
        return stop


class StopWatch:
    """Looks at the cluster's stop every `interval` seconds (jittered, so that N nodes do not
    look in step) and calls `on_stop` once when another node has stopped the cluster."""

    def __init__(
        self,
        control: ClusterControl,
        interval: float,
        on_stop: Callable[[Stop | None], None],
        log: Callable[[str], None],
        follower: Follower | None = None,
        on_generation: Callable[[Generation], None] | None = None,
    ) -> None:
        """follower (recover): each look also follows the members' generation; a newer one
        that keeps this node's rank calls on_generation (fabric run stops, to start again)."""
        self.control = control
        self.interval = interval
        self.on_stop = on_stop
        self.log = log
        self.follower = follower
        self.on_generation = on_generation
        self.stop_seen: Stop | None = None  # the stop in force (cleared by a new generation)
        self.handled: Stop | None = None  # the last stop acted on
        self.replaced = False  # the members give this node's rank to another instance now
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def next_delay(self) -> float:
        return self.interval * random.uniform(0.5, 1.5)

    def poll(self) -> Stop | None:
        try:
            stop = self.control.read_stop()
        except (BotoCoreError, ClientError):
            return None  # look again later: a throttled or failed look is not a stop
        if stop is not None and stop.instance != self.control.instance:
            return stop
        return None

    def _loop(self) -> None:
        while not self._done.wait(self.next_delay()):
            stop = self.poll()
            self.follow()
            if not self.control.holds_rank():
                self.replaced = True
                self.log("another instance holds this node's rank now (a redeploy): stopping")
                self.on_stop(None)
                return
            if stop and stop != self.handled:
                self.handled = self.stop_seen = stop
                self.log(f"{stop.describe()}: the cluster stops")
                self.on_stop(stop)
                if not (self.follower and is_spot_notice(stop)):
                    return
                # recover: the noticed node's group replaces it; the next generation follows.

    def follow(self) -> None:
        seen = self.control.generation
        if self.follower is None or seen is None:
            return
        if self.follower.look(seen) is Change.RESTART:
            state = "complete" if seen.complete else "pending: a rank's replacement is launching"
            self.log(f"generation {seen.number} ({state}): fabric run stops, to start again")
            if self.on_generation:
                self.on_generation(seen)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="stop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread:
            self._thread.join(timeout=JOIN_TIMEOUT)  # a daemon: a throttled look holds nothing
