"""The cluster-wide parameters on the emulated AWS: members, the stop (first writer wins), and
phases that say whose they are; an old deploy's writes are ignored."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError

from stacks.config import members_parameter, stop_parameter
from userdata.cluster_control import NO_STOP, ClusterControl, Stop, StopWatch
from userdata.errors import AgentError
from userdata.main_address import wait_for_main_address
from userdata.phase import Phase, PhaseReporter, decode_phase, encode_phase


def cluster(ssm: Any, members: list[str]) -> tuple[str, str]:
    stack = f"Control{uuid.uuid4().hex[:8]}"
    ssm.put_parameter(Name=members_parameter(stack), Value=",".join(members), Type="String")
    ssm.put_parameter(Name=stop_parameter(stack), Value=NO_STOP, Type="String")
    return members_parameter(stack), stop_parameter(stack)


def control(ssm: Any, names: tuple[str, str], rank: int, instance: str) -> ClusterControl:
    return ClusterControl(ssm, *names, rank, instance, log=print)


def test_the_first_stop_wins_and_every_node_reads_it(ssm: Any) -> None:
    names = cluster(ssm, ["i-a", "i-b", "i-c"])
    node2, node1, node0 = (
        control(ssm, names, r, i) for r, i in ((2, "i-c"), (1, "i-b"), (0, "i-a"))
    )
    assert node0.read_stop() is None  # the stack's initial value
    first = node2.declare("failed", "install: no such package")
    assert first == Stop("failed", 2, "i-c", "install: no such package")
    # A node that fails because of it (or later) does not overwrite the root cause.
    assert node1.declare("failed", "fabric run exited with status 1") == first
    assert node0.read_stop() == first
    assert ssm.get_parameter(Name=names[1])["Parameter"]["Version"] == 2  # one write


def test_a_replaced_node_neither_stops_the_cluster_nor_is_heard(ssm: Any) -> None:
    """A redeploy: i-old held rank 1; the members now list i-new there."""
    names = cluster(ssm, ["i-zero", "i-new"])
    old = control(ssm, names, 1, "i-old")
    assert not old.is_member()
    assert old.declare("interrupted", "stopped from outside") is None
    assert control(ssm, names, 0, "i-zero").read_stop() is None
    # Written anyway (an old agent of an older version): not this cluster's stop.
    stray = Stop("failed", 1, "i-old", "stopped")
    ssm.put_parameter(Name=names[1], Value=stray.encode(), Type="String", Overwrite=True)
    assert control(ssm, names, 0, "i-zero").read_stop() is None


def test_a_stop_from_before_this_boot_is_old(ssm: Any) -> None:
    """Instances stopped and started again (user data does not run again; the agent does)."""
    names = cluster(ssm, ["i-a", "i-b"])
    control(ssm, names, 1, "i-b").declare("interrupted", "max_hours=1 reached")
    node0 = control(ssm, names, 0, "i-a")
    assert node0.read_stop() is not None
    node0.booted = datetime.now(UTC).timestamp() + 3600  # booted after the stop was written
    assert node0.read_stop() is None


def test_the_watch_ignores_this_nodes_own_stop_and_reports_a_peers(ssm: Any) -> None:
    names = cluster(ssm, ["i-a", "i-b"])
    seen: list[Stop] = []
    watch = StopWatch(control(ssm, names, 0, "i-a"), 1.0, seen.append, log=print)
    control(ssm, names, 0, "i-a").declare("interrupted", "spot instance-action {}")
    assert watch.poll() is None  # its own: the agent knows already
    ssm.put_parameter(Name=names[1], Value=NO_STOP, Type="String", Overwrite=True)
    control(ssm, names, 1, "i-b").declare("failed", "boot phase venv (exit status 1)")
    assert watch.poll() == Stop("failed", 1, "i-b", "boot phase venv (exit status 1)")
    delays = [watch.next_delay() for _ in range(200)]
    assert 0.5 <= min(delays) < max(delays) <= 1.5  # jittered: N nodes do not look in step


@pytest.mark.parametrize(
    ("value", "phase"),
    [
        ("booting", Phase("booting", None)),
        (encode_phase("training (new run)", "i-1"), Phase("training (new run)", "i-1")),
        ('{"phase": 3}', Phase('{"phase": 3}', None)),
        ("[1, 2]", Phase("[1, 2]", None)),
    ],
)
def test_phases_say_whose_they_are(value: str, phase: Phase) -> None:
    assert decode_phase(value) == phase


def test_a_replaced_nodes_reporter_goes_quiet(ssm: Any) -> None:
    name = f"/fabric/Phase{uuid.uuid4().hex[:8]}/node-0/phase"
    reporter = PhaseReporter(ssm, name, "i-0")
    reporter.record("training")
    assert decode_phase(ssm.get_parameter(Name=name)["Parameter"]["Value"]) == Phase(
        "training", "i-0"
    )
    reporter.silenced = "another instance holds this rank now (a redeploy)"
    reporter.record("failed: stopped")
    assert decode_phase(ssm.get_parameter(Name=name)["Parameter"]["Value"]).text == "training"


class ThrottledSsm:
    """Throttles the first `refusals` looks, then has the main address (and the members)."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.looks = 0

    def get_parameters(self, Names: list[str]) -> dict[str, Any]:  # boto3's parameter name
        self.looks += 1
        if self.looks <= self.refusals:
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                "GetParameters",
            )
        values = {"/main": "10.42.0.4", "/members": "i-a,i-b"}
        return {"Parameters": [{"Name": n, "Value": values[n]} for n in Names]}


def test_throttling_while_waiting_for_the_main_node_only_delays_it() -> None:
    """A ThrottlingException that outlasts botocore's retries is one more look, not a failed
    node (which would stop every node of the cluster)."""
    ssm, waited = ThrottledSsm(refusals=5), []
    address = wait_for_main_address(
        ssm,
        "/main",
        300.0,
        members_parameter="/members",
        instance="i-b",
        rank=1,
        log=lambda _: None,
        clock=lambda: sum(waited),
        sleep=waited.append,
    )
    assert address == "10.42.0.4" and ssm.looks == 6
    assert all(0 < wait <= 10.0 for wait in waited)


def test_a_node_not_yet_among_the_members_waits_for_cloudformation() -> None:
    """A redeploy's new node boots before CloudFormation has written the new members (and the
    new node 0's address): it waits, and past the bound says it belongs to another deploy."""
    ssm, waited = ThrottledSsm(refusals=0), []
    with pytest.raises(AgentError, match="i-new is not yet among /members after 60 s"):
        wait_for_main_address(
            ssm,
            "/main",
            60.0,
            members_parameter="/members",
            instance="i-new",
            rank=1,
            log=lambda _: None,
            clock=lambda: sum(waited),
            sleep=waited.append,
        )


def test_a_node_whose_rank_another_instance_holds_stops_its_run(ssm: Any) -> None:
    """A redeploy: CloudFormation wrote the new members; the old node 1 stops training (its
    run is the new cluster's now) instead of uploading an old branch into the same run."""
    names = cluster(ssm, ["i-a", "i-old"])
    told: list[Stop | None] = []
    watch = StopWatch(control(ssm, names, 1, "i-old"), 0.01, told.append, log=print)
    watch.start()
    ssm.put_parameter(Name=names[0], Value="i-a,i-new", Type="String", Overwrite=True)
    deadline = datetime.now(UTC).timestamp() + 10
    while not told and datetime.now(UTC).timestamp() < deadline:
        watch._done.wait(0.02)
    watch.stop()
    assert told == [None] and watch.replaced


class ClashingSsm:
    """Another node's PutParameter lands first: SSM refuses this one (TooManyUpdates)."""

    def __init__(self, ssm: Any, names: tuple[str, str], theirs: Stop) -> None:
        self.ssm, self.names, self.theirs = ssm, names, theirs

    def get_parameters(self, **kwargs: Any) -> Any:
        return self.ssm.get_parameters(**kwargs)

    def put_parameter(self, **kwargs: Any) -> Any:
        self.ssm.put_parameter(
            Name=self.names[1], Value=self.theirs.encode(), Type="String", Overwrite=True
        )
        raise ClientError(
            {"Error": {"Code": "TooManyUpdates", "Message": "concurrent updates"}}, "PutParameter"
        )


def test_two_nodes_stopping_at_once_agree_on_one_stop(ssm: Any) -> None:
    names = cluster(ssm, ["i-a", "i-b"])
    theirs = Stop("failed", 0, "i-a", "install: no such package")
    node1 = ClusterControl(ClashingSsm(ssm, names, theirs), *names, 1, "i-b", log=print)
    assert node1.declare("interrupted", "spot instance-action {}") == theirs
    assert control(ssm, names, 1, "i-b").read_stop() == theirs


def test_a_long_reason_in_any_script_stays_within_ssms_4096_characters(ssm: Any) -> None:
    names = cluster(ssm, ["i-a"])
    reason = "é" * 5000  # an escape per character would be 30000 characters
    stop = control(ssm, names, 0, "i-a").declare("failed", reason)
    assert stop is not None and len(stop.encode()) <= 4096
    assert len(encode_phase("ü" * 5000, "i-a")) <= 4096
