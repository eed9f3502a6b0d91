"""recover: a new generation stops fabric run and starts it again with the generation's main
address (userdata/training.supervise): not a restart, and at most --max-replacements times."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from userdata import training
from userdata.launch import STATUS_DIR_ENV
from userdata.phase import PhaseReporter


class Phases(PhaseReporter):
    def __init__(self) -> None:
        super().__init__(None, None)
        self.said: list[str] = []

    def record(self, phase: str) -> None:
        self.said.append(phase)


@pytest.fixture(autouse=True)
def _generation_event() -> Iterator[None]:
    training.GENERATION_MOVED.clear()
    yield
    training.GENERATION_MOVED.clear()


def options(max_replacements: int) -> argparse.Namespace:
    return argparse.Namespace(
        max_replacements=max_replacements, max_restarts=0, restart_delay=0.0, workdir="",
        devices_per_node=1,
    )  # fmt: skip


def test_a_new_generation_starts_fabric_run_again_with_its_address(tmp_path: Path) -> None:
    phases, joined = Phases(), []

    def rejoin() -> tuple[list[str], dict[str, str]]:
        joined.append(True)
        return [sys.executable, "-c", "print('generation 2')"], {"MAIN": "10.0.0.7"}

    # Generation 2 came while this node waited to start again: it starts once, in it.
    first = [sys.executable, "-c", "import sys; sys.exit(143)"]
    training.GENERATION_MOVED.set()
    environment = {STATUS_DIR_ENV: str(tmp_path)}
    result = training.supervise(first, environment, options(1), phases, rejoin=rejoin)
    assert result == (0, "") and joined == [True]
    assert phases.said == ["waiting-for-main", "training (generation ?)"]
    assert environment["MAIN"] == "10.0.0.7"


def test_past_max_replacements_the_run_fails_with_the_reason(tmp_path: Path) -> None:
    phases = Phases()
    training.GENERATION_MOVED.set()
    result = training.supervise(
        [sys.executable, "-c", "pass"],
        {STATUS_DIR_ENV: str(tmp_path)},
        options(0),
        phases,
        rejoin=lambda: ([sys.executable, "-c", "pass"], {}),
    )
    assert result == (1, "more than max_replacements=0 replacements in this run")
    assert phases.said == []  # no fabric run started
