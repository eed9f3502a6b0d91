"""IMDSv2 tokens expire (at most 6 hours on EC2): the client renews them and the spot watcher
still sees a notice afterwards. Stub tokens here live about a second."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from rehearsal.imds_stub import ImdsStub, node_values
from userdata.imds import TOKEN_TTL_SECONDS, Imds
from userdata.spot import NOTICE_PATH, SpotWatcher

NOTICE = '{"action": "terminate", "time": "2030-01-01T00:00:00Z"}'
# A worker that checkpoints on SIGUSR1 (here: exits 42), as the spot contract asks.
HANDLER = (
    "import signal, sys, time; "
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(42)); "
    "time.sleep(30)"
)


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def puts(stub: ImdsStub) -> int:
    return sum(method == "PUT" for method, _, _ in stub.requests)


@pytest.mark.parametrize(
    ("client_ttl", "stub_max_ttl"),
    [(1, None), (TOKEN_TTL_SECONDS, 1.0)],
    ids=["client-asks-1s", "imds-grants-1s"],
)
def test_token_is_renewed_before_it_expires(client_ttl: int, stub_max_ttl: float | None) -> None:
    with ImdsStub(node_values("i-1", "10.0.0.1", 0, 1), max_token_ttl=stub_max_ttl) as stub:
        imds = Imds(stub.url, token_ttl=client_ttl)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            assert imds.get("instance-id") == "i-1"
            time.sleep(0.05)
    assert all(valid for method, _, valid in stub.requests if method == "GET"), "a 401 was seen"
    assert puts(stub) >= 3


def test_token_revoked_behind_the_clients_back_is_replaced_once() -> None:
    with ImdsStub(node_values("i-1", "10.0.0.1", 0, 1)) as stub:
        imds = Imds(stub.url)
        assert imds.get("instance-id") == "i-1"
        stub.expire_tokens()
        del stub.requests[:]
        assert imds.get("instance-id") == "i-1"
    path = "/latest/meta-data/instance-id"
    assert stub.requests == [
        ("GET", path, False),
        ("PUT", "/latest/api/token", False),
        ("GET", path, True),
    ]


def test_spot_notice_after_the_first_token_expired_is_seen() -> None:
    logs: list[str] = []
    stub = ImdsStub(node_values("i-1", "10.0.0.1", 0, 1), max_token_ttl=1.0).start()
    # A stand-in for fabric run: its child (the "worker", which handles SIGUSR1) gets it.
    fabric = subprocess.Popen(["sh", "-c", f"{sys.executable} -c {HANDLER!r} & wait $!"])
    watcher = SpotWatcher(Imds(stub.url), 0.05, logs.append)
    try:
        watcher.attach(fabric.pid)
        watcher.start()
        time.sleep(1.5)  # the first token has expired by now
        assert watcher.notice is None
        stub.values[NOTICE_PATH] = NOTICE
        assert fabric.wait(timeout=5) == 42
        assert watcher.notice == NOTICE
        assert logs == [f"spot interruption notice: {NOTICE}; asking the payload to checkpoint"]
        assert puts(stub) >= 2
    finally:
        watcher.stop()
        fabric.kill()
        fabric.wait()
        stub.stop()


def test_spot_watcher_says_once_that_imds_refuses_tokens_and_keeps_looking() -> None:
    logs: list[str] = []
    with ImdsStub(node_values("i-1", "10.0.0.1", 0, 1), max_token_ttl=0) as stub:
        watcher = SpotWatcher(Imds(stub.url), 0.02, logs.append)
        watcher.start()
        try:
            assert wait_for(lambda: puts(stub) >= 10)
            assert len(logs) == 1
            assert "HTTP 401" in logs[0] and "still looking" in logs[0]
            stub.max_token_ttl = None  # IMDS accepts tokens again
            stub.values[NOTICE_PATH] = NOTICE
            assert wait_for(lambda: watcher.notice)
        finally:
            watcher.stop()
    assert len(logs) == 2 and NOTICE in logs[1]


def test_a_worker_without_a_sigusr1_handler_is_not_killed_by_the_notice() -> None:
    """SIGUSR1's default action ends the process: a script that does not handle it would lose
    everything since its last checkpoint, and the rest of its two minutes."""
    logs: list[str] = []
    stub = ImdsStub(node_values("i-1", "10.0.0.1", 0, 1)).start()
    fabric = subprocess.Popen(["sh", "-c", "sleep 30 & wait $!"])  # sleep handles nothing
    watcher = SpotWatcher(Imds(stub.url), 0.05, logs.append)
    try:
        watcher.attach(fabric.pid)
        watcher.start()
        assert wait_for(lambda: puts(stub) >= 1)
        stub.values[NOTICE_PATH] = NOTICE
        assert wait_for(lambda: len(logs) >= 2)
        time.sleep(0.3)  # the watcher looks again for handlers: still none
        assert fabric.poll() is None  # still training
        assert len(logs) == 2 and "does not handle SIGUSR1: not signalled" in logs[1]
    finally:
        watcher.stop()
        fabric.kill()
        fabric.wait()
        stub.stop()
