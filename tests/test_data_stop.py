"""Why a node's data copy stops (userdata/training.StopLook): SIGTERM here, or the cluster's
stop written by another node, looked at no more often than Parameter Store can bear."""

from __future__ import annotations

import pytest

from userdata import training
from userdata.cluster_control import FAILED, Stop
from userdata.stop_handling import TERMINATED


class Control:
    instance = "i-0"

    def __init__(self, stop: Stop | None) -> None:
        self.stop = stop
        self.reads = 0

    def read_stop(self) -> Stop | None:
        self.reads += 1
        return self.stop


def test_another_nodes_failure_stops_the_copy_at_the_next_look(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(training, "PEER_LOOK_SECONDS", 0.0)
    control = Control(Stop(FAILED, 1, "i-1", "out of memory"))
    look = training.StopLook(control, max_hours=12)  # type: ignore[arg-type]
    assert look() == "node 1 failed (out of memory)"
    assert look.stop is control.stop


def test_its_own_stop_is_not_a_reason_and_looks_are_spaced(monkeypatch: pytest.MonkeyPatch) -> None:
    control = Control(Stop(FAILED, 0, "i-0", "this node"))
    look = training.StopLook(control, max_hours=12)  # type: ignore[arg-type]
    assert look() is None and control.reads == 0  # not yet: PEER_LOOK_SECONDS
    monkeypatch.setattr(training, "PEER_LOOK_SECONDS", 0.0)
    assert look() is None and control.reads == 1


def test_sigterm_here_stops_the_copy_at_once() -> None:
    look = training.StopLook(None, max_hours=12)
    TERMINATED.set()
    try:
        assert look().startswith("stopped from outside")
    finally:
        TERMINATED.clear()


class Phases:
    def __init__(self) -> None:
        self.recorded: list[str] = []

    def record(self, phase: str) -> None:
        self.recorded.append(phase)


def test_a_copy_stopped_by_another_nodes_failure_fails_this_one_else_is_interrupted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(training, "PEER_LOOK_SECONDS", 0.0)
    failed = training.StopLook(Control(Stop(FAILED, 1, "i-1", "oom")), 12)  # type: ignore[arg-type]
    reason = failed()
    with pytest.raises(training.PeerFailed, match=r"node 1 failed \(oom\)"):
        training.copy_stopped(training.CopyStopped(reason), failed, Phases())  # type: ignore[arg-type]
    phases = Phases()
    interrupted = training.StopLook(Control(Stop("interrupted", 1, "i-1", "spot")), 12)  # type: ignore[arg-type]
    status = training.copy_stopped(training.CopyStopped(interrupted()), interrupted, phases)  # type: ignore[arg-type]
    assert status == 0 and phases.recorded == ["interrupted: node 1 interrupted (spot)"]
