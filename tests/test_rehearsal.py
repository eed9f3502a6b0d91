"""The rehearsal: the real template on moto, every node's real user data in its own namespace."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rehearsal.namespaces import namespaces_available
from stacks.config import PROJECT_DIR

REASON = namespaces_available()
pytestmark = pytest.mark.skipif(
    REASON == "this platform has no network namespaces", reason=str(REASON)
)


def leftovers(pid: int) -> tuple[list[str], list[str]]:
    """Namespaces and processes a rehearsal with this pid left behind."""
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    ours = [line for line in namespaces.splitlines() if line.startswith(f"fr{pid % 100000}-")]
    processes = subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True, check=True
    ).stdout
    strays = [
        line
        for line in processes.splitlines()
        if "rehearsal.imds_stub" in line
        or "rehearsal.forward" in line
        or "fabric-rehearsal-" in line
    ]
    return ours, strays


@pytest.mark.parametrize(("nodes", "devices", "main_delay"), [(2, 2, 0), (3, 1, 20)])
def test_rehearsal_trains_across_namespaces_and_destroys(
    nodes: int, devices: int, main_delay: int
) -> None:
    assert REASON is None, REASON  # CI runs as root with iproute2 (.ci/run installs it)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rehearsal.run",
            "--num-nodes",
            str(nodes),
            "--devices-per-node",
            str(devices),
            "--main-node-delay",
            str(main_delay),
        ],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:] + err[-4000:]
    assert f"world size {nodes * devices};" in out
    assert "final weights equal the local cluster's, bit for bit" in out
    assert "after destroy only the artifacts bucket remains" in out
    for rank in range(nodes):
        assert f"[node {rank}] [fabric-agent] phase: done" in out
        assert f"[node {rank}] [fabric-agent] would stop now" in out
    assert "REHEARSAL: using the venv" in out
    if main_delay:  # the other nodes waited for the main node, then trained with it
        assert f"node 0 boots in {main_delay} s" in out
    assert leftovers(process.pid) == ([], [])


def test_a_failed_rehearsal_removes_everything_it_made() -> None:
    assert REASON is None, REASON
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rehearsal.run",
            "--num-nodes",
            "2",
            "--devices-per-node",
            "1",
            "--timeout",
            "3",
        ],
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "[rehearsal] error: node 0 did not finish within 3 s" in err
    assert "train (boot to done)                   " in out and "FAILED" in out
    assert leftovers(process.pid) == ([], [])
