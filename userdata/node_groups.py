"""recover: each rank is an Auto Scaling group of one instance. Node 0 reads which instance holds
each rank and publishes the cluster's generation (its own address, then the members); a node
whose run is over scales its own group to zero, and the group terminates it (a node that only
powered off would be taken for a failed one and replaced). Each node its own: node 0 done
first does not cut another node's end short."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from userdata.errors import AgentError
from userdata.generations import Generation, next_generation, watched_generation
from userdata.imds import TAG_CLUSTER, TAG_NODE_RANK

LIVE_STATES = ("Pending", "Pending:Wait", "Pending:Proceed", "InService")


def cluster_groups(autoscaling: Any, cluster: str) -> dict[int, dict[str, Any]]:
    """The cluster's groups by rank (their tags say both), in one call per 100 groups. During
    a redeploy CloudFormation keeps a rank's old group until the new one exists: the newest
    group holds the rank."""
    groups: dict[int, dict[str, Any]] = {}
    pages = autoscaling.get_paginator("describe_auto_scaling_groups").paginate(
        Filters=[{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}]
    )
    for page in pages:
        for group in page.get("AutoScalingGroups", []):
            tags = {tag["Key"]: tag["Value"] for tag in group.get("Tags", [])}
            if tags.get(TAG_CLUSTER) != cluster or not tags.get(TAG_NODE_RANK, "").isdigit():
                continue
            rank = int(tags[TAG_NODE_RANK])
            if rank not in groups or created(group) > created(groups[rank]):
                groups[rank] = group
    return groups


def created(group: dict[str, Any]) -> Any:
    return group.get("CreatedTime") or ""


def own_group(autoscaling: Any, instance: str) -> str | None:
    """The group that launched this instance (during a redeploy its rank has two)."""
    found = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance])
    instances = found.get("AutoScalingInstances", [])
    return str(instances[0]["AutoScalingGroupName"]) if instances else None


def leave(autoscaling: Any, instance: str, log: Callable[[str], None]) -> bool:
    """This node's own group to zero: the group terminates it, nothing replaces it."""
    try:
        name = own_group(autoscaling, instance)
        if name is None:
            log(f"{instance} is in no Auto Scaling group")
            return False
        autoscaling.update_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=0, DesiredCapacity=0
        )
    except (BotoCoreError, ClientError) as error:
        log(f"could not scale this node's group to zero: {error}")
        return False
    log(f"this node's group {name} scaled to zero: it terminates, nothing replaces it")
    return True


def give_way(autoscaling: Any, instance: str, log: Callable[[str], None]) -> bool:
    """A node with a spot notice, once its checkpoint is safe: its group terminates it and
    launches the replacement now, not when EC2 reclaims it two minutes later."""
    try:
        autoscaling.terminate_instance_in_auto_scaling_group(
            InstanceId=instance, ShouldDecrementDesiredCapacity=False
        )
    except (BotoCoreError, ClientError) as error:
        log(f"could not hand this node back to its group (EC2 reclaims it anyway): {error}")
        return False
    log("spot notice: this node's group terminates it and launches its replacement now")
    return True


def holders(groups: dict[int, dict[str, Any]], num_nodes: int) -> list[str | None]:
    """The instance that holds each rank: its group's one that is launching or in service and
    healthy (None while the group has none: a replacement not launched yet)."""
    found: list[str | None] = []
    for rank in range(num_nodes):
        live = [
            instance["InstanceId"]
            for instance in groups.get(rank, {}).get("Instances", [])
            if instance.get("LifecycleState") in LIVE_STATES
            and instance.get("HealthStatus", "Healthy") == "Healthy"
        ]
        found.append(live[0] if live else None)
    return found


def publish_generation(
    ssm: Any,
    autoscaling: Any,
    *,
    cluster: str,
    num_nodes: int,
    instance: str,
    private_ip: str,
    main_address_parameter: str,
    members_parameter: str,
    timeout: float,
    log: Callable[[str], None],
    interval: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Generation:
    """Node 0, at its start: once every rank's group holds an instance (at most `timeout`
    seconds: capacity_wait_minutes), its address, then the generation that lists them. The
    address goes first: a node that finds itself among the members reads the new address."""
    deadline = clock() + timeout
    while True:
        try:
            found = holders(cluster_groups(autoscaling, cluster), num_nodes)
        except (BotoCoreError, ClientError) as error:
            raise AgentError(f"cannot read the groups of cluster {cluster}: {error}") from None
        if found[0] not in (None, instance):
            raise AgentError(
                f"rank 0's group holds {found[0]}, not this instance {instance}: "
                "this node was replaced"
            )
        missing = [rank for rank, holder in enumerate(found) if holder is None]
        if not missing:
            break
        if clock() >= deadline:
            raise AgentError(
                f"no instance for rank(s) {missing} after {timeout / 60:g} min "
                "(capacity_wait_minutes): EC2 had no capacity for them"
            )
        log(f"waiting for an instance in the groups of rank(s) {missing}")
        sleep(interval)
    current = read_generation(ssm, members_parameter)
    generation = next_generation(current, found)
    ssm.put_parameter(Name=main_address_parameter, Value=private_ip, Type="String", Overwrite=True)
    if generation is None:  # this node 0 started again (a reboot): the members still hold
        assert current is not None
        return current
    ssm.put_parameter(
        Name=members_parameter, Value=generation.encode(), Type="String", Overwrite=True
    )
    log(f"generation {generation.number}: main address {private_ip}, members {generation.members}")
    return generation


def read_generation(ssm: Any, members_parameter: str) -> Generation | None:
    try:
        value = ssm.get_parameter(Name=members_parameter)["Parameter"]["Value"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise
    return Generation.decode(value)


def scale_to_zero(
    autoscaling: Any,
    cluster: str,
    log: Callable[[str], None],
    ranks: list[int] | None = None,
) -> bool:
    """The groups of these ranks (default: every one) to zero: their run is over, nothing is
    to be replaced, and each group terminates its instance. Says whether every one took it."""
    try:
        groups = cluster_groups(autoscaling, cluster)
        chosen = [groups[rank] for rank in sorted(groups) if ranks is None or rank in ranks]
        for group in chosen:
            autoscaling.update_auto_scaling_group(
                AutoScalingGroupName=group["AutoScalingGroupName"], MinSize=0, DesiredCapacity=0
            )
    except (BotoCoreError, ClientError) as error:
        log(f"could not scale the groups of cluster {cluster} to zero: {error}")
        return False
    if ranks is not None and len(chosen) != len(ranks):
        log(f"cluster {cluster} has no group for some of the ranks {ranks}")
        return False
    names = ", ".join(str(rank) for rank in (ranks if ranks is not None else sorted(groups)))
    log(f"the group(s) of rank(s) {names} scaled to zero: their instances terminate")
    return True


class GroupWatch:
    """Node 0, while the cluster trains (recover): every `interval` seconds (jittered), which
    instance holds each rank. When one changed it publishes the next generation, pending while
    a rank has no live instance (every node stops its fabric run at once) and complete once
    the replacement is there (every node starts again, the replacement with them)."""

    def __init__(
        self,
        ssm: Any,
        autoscaling: Any,
        *,
        cluster: str,
        num_nodes: int,
        instance: str,
        members_parameter: str,
        generation: Generation,
        interval: float,
        log: Callable[[str], None],
    ) -> None:
        self.ssm, self.autoscaling = ssm, autoscaling
        self.cluster, self.num_nodes, self.instance = cluster, num_nodes, instance
        self.members_parameter = members_parameter
        self.generation = generation
        self.interval = interval
        self.log = log
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> Generation | None:
        """One look; the generation it published, if any."""
        try:
            found = holders(cluster_groups(self.autoscaling, self.cluster), self.num_nodes)
        except (BotoCoreError, ClientError) as error:
            self.log(f"could not read the groups (looking again): {error}")
            return None
        if found[0] != self.instance:  # this node 0 is going: the next one publishes
            return None
        new = watched_generation(self.generation, found)
        if new is None:
            return None
        try:
            self.ssm.put_parameter(
                Name=self.members_parameter, Value=new.encode(), Type="String", Overwrite=True
            )
        except (BotoCoreError, ClientError) as error:
            self.log(f"could not publish generation {new.number} (trying again): {error}")
            return None
        before = self.generation.members
        changed = [rank for rank, member in enumerate(new.members) if member != before[rank]]
        self.generation = new
        state = "complete" if new.complete else "pending: a replacement is launching"
        self.log(f"rank(s) {changed} have another instance now")
        self.log(f"generation {new.number} published ({state}): {new.encode()}")
        return new

    def _loop(self) -> None:
        while not self._done.wait(self.interval * random.uniform(0.5, 1.5)):
            self.look()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="group-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread:
            self._thread.join(timeout=5.0)


def main() -> int:
    """`python -m userdata.node_groups`: this node leaves its group (boot.sh, before a power-off
    on a failure: a powered-off instance of a group is replaced)."""
    from userdata.aws_clients import aws_client
    from userdata.imds import Imds

    imds = Imds()
    instance = imds.require("instance-id")
    region = imds.require("placement/region")
    autoscaling = aws_client("autoscaling", region, 10.0)
    return 0 if leave(autoscaling, instance, lambda line: print(f"[fabric-boot] {line}")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
