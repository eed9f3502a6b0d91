"""What a 64-node cluster's agents cost Parameter Store, counted on the agents' own code.

Each node runs the real `wait_for_main_address` (boot) and the real `StopWatch` (training)
against an SSM that counts every call, on a virtual clock: 64 nodes for minutes take no real
time. The budget is the README's ("What the control plane costs"); Parameter Store's default
is about 40 transactions per second for GetParameter(s), shared by the whole account.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from userdata.cluster_control import NO_STOP, ClusterControl, StopWatch
from userdata.main_address import wait_for_main_address

NODES = 64
MAIN = "/fabric/Scale/main-address"
MEMBERS = "/fabric/Scale/members"
STOP = "/fabric/Scale/stop"
PEER_POLL_INTERVAL = 15.0  # the agent's default (--peer-poll-interval)
MAIN_BOOTS_AT = 240.0  # node 0 is the slowest to boot: the others wait four minutes for it
ACCOUNT_GET_TPS = 40.0


class CountingSsm:
    """GetParameters on a virtual clock: the main address exists from MAIN_BOOTS_AT on."""

    def __init__(self, members: list[str]) -> None:
        self.now = 0.0
        self.calls: list[tuple[float, str]] = []  # (virtual time, operation)
        self.members = ",".join(members)

    def get_parameters(self, Names: list[str]) -> dict[str, Any]:  # boto3's parameter name
        self.calls.append((self.now, "GetParameters"))
        values = {MEMBERS: self.members, STOP: NO_STOP}
        if self.now >= MAIN_BOOTS_AT:
            values[MAIN] = "10.42.0.4"
        return {"Parameters": [{"Name": n, "Value": values[n]} for n in Names if n in values]}


def per_second(calls: list[tuple[float, str]], start: float, end: float) -> tuple[float, int]:
    """Mean calls per second over [start, end), and the most in any one second."""
    inside = [t for t, _ in calls if start <= t < end]
    busiest = Counter(int(t) for t in inside).most_common(1)
    return len(inside) / (end - start), busiest[0][1] if busiest else 0


def boot(ssm: CountingSsm, rank: int, booted_at: float) -> None:
    """One node waiting for the main address, from its boot until node 0 has published it."""
    ssm.now = booted_at

    def sleep(seconds: float) -> None:
        ssm.now += seconds

    wait_for_main_address(
        ssm,
        MAIN,
        900.0,
        members_parameter=MEMBERS,
        instance=f"i-{rank}",
        rank=rank,
        log=lambda _: None,
        clock=lambda: ssm.now,
        sleep=sleep,
    )


def watch(ssm: CountingSsm, rank: int, start: float, end: float) -> None:
    """One node's stop watch through training: its jittered looks, each one real poll."""
    control = ClusterControl(ssm, MEMBERS, STOP, rank, f"i-{rank}", log=lambda _: None)
    stop_watch = StopWatch(control, PEER_POLL_INTERVAL, on_stop=_never, log=lambda _: None)
    ssm.now = start + stop_watch.next_delay()
    while ssm.now < end:
        assert stop_watch.poll() is None
        ssm.now += stop_watch.next_delay()


def _never(_stop: Any) -> None:
    raise AssertionError("nobody stopped this cluster")


def simulate(spread: Callable[[int], float], nodes: int = NODES) -> CountingSsm:
    random.seed(nodes)
    ssm = CountingSsm([f"i-{rank}" for rank in range(nodes)])
    for rank in range(1, nodes):
        boot(ssm, rank, spread(rank))
    for rank in range(nodes):
        watch(ssm, rank, MAIN_BOOTS_AT, MAIN_BOOTS_AT + 600.0)
    return ssm


def test_a_64_node_cluster_costs_parameter_store_a_few_calls_a_second() -> None:
    # Nodes 1..63 finish installing within the same minute (the worst case: a burst).
    ssm = simulate(lambda rank: 60.0 + rank * 60.0 / NODES)
    waiting_mean, waiting_peak = per_second(ssm.calls, 120.0, MAIN_BOOTS_AT)
    training_mean, training_peak = per_second(ssm.calls, MAIN_BOOTS_AT + 60, MAIN_BOOTS_AT + 600)
    per_minute = training_mean * 60
    print(
        f"64 nodes: waiting for node 0 {waiting_mean:.1f}/s (peak {waiting_peak} in a second), "
        f"training {training_mean:.1f}/s = {per_minute:.0f}/min (peak {training_peak})"
    )
    # Training: one GetParameters per node per 15 s look, jittered: N/15 a second, not N^2.
    assert 0.8 * NODES / PEER_POLL_INTERVAL <= training_mean <= 1.2 * NODES / PEER_POLL_INTERVAL
    assert training_peak <= 20  # jitter spreads the looks: no second near the account's 40
    # Waiting for node 0: backoff to 10 s looks (jittered), never the account's whole budget.
    assert waiting_mean <= 0.3 * ACCOUNT_GET_TPS
    assert waiting_peak < ACCOUNT_GET_TPS
    assert {operation for _, operation in ssm.calls} == {"GetParameters"}


def test_the_cost_grows_with_n_not_n_squared() -> None:
    """The peer watch this replaces read every other node's phase (10 names a call): at 64
    nodes 64 x 7 calls per look, about 30 a second. Four times the nodes now cost four times
    the calls, measured on the watch itself."""
    rates = {}
    for nodes in (16, 64):
        ssm = simulate(lambda rank: 60.0, nodes)
        rates[nodes] = per_second(ssm.calls, MAIN_BOOTS_AT + 60, MAIN_BOOTS_AT + 600)[0]
    assert 3.3 <= rates[64] / rates[16] <= 4.7, rates
