"""Watches the other nodes' phases: when one has failed for good, this node's `fabric run` is
stopped at once, instead of waiting out rendezvous timeouts for a peer that will never come
(with the defaults, 3 restarts x 600 s of billing for nothing)."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

FAILED = "failed: "
# A peer that failed because another one did names the first one: report that one.
_CASCADE = re.compile(r"^node (\d+) failed \((.*)\)$", re.DOTALL)
MAX_NAMES_PER_CALL = 10  # SSM GetParameters


def boot_time() -> float:
    """When this machine booted (epoch seconds), from /proc/uptime; 0 where there is none."""
    try:
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return datetime.now(UTC).timestamp() - uptime - 60  # a minute's slack for clock steps


class PeerWatch:
    def __init__(
        self,
        ssm: Any,
        parameter_template: str,
        num_nodes: int,
        own_rank: int,
        interval: float,
        log: Callable[[str], None],
    ) -> None:
        self.ssm = ssm
        self.names = {
            parameter_template.format(rank=rank): rank
            for rank in range(num_nodes)
            if rank != own_rank
        }
        self.interval = interval
        self.log = log
        self.failed: tuple[int, str] | None = None  # (rank, reason) of the first failed peer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: Any = None
        self._lock = threading.Lock()
        self.booted = boot_time()

    def poll(self) -> tuple[int, str] | None:
        """The first peer whose phase says failed since this node booted, by rank; None if
        none (or SSM hiccups). An older one is a previous cluster's: CloudFormation does not
        reset a parameter whose template value did not change."""
        names = sorted(self.names, key=self.names.__getitem__)
        found: list[tuple[int, str]] = []
        for start in range(0, len(names), MAX_NAMES_PER_CALL):
            try:
                answer = self.ssm.get_parameters(Names=names[start : start + MAX_NAMES_PER_CALL])
            except (BotoCoreError, ClientError):
                return None  # look again later: a hiccup is not a failed peer
            for parameter in answer.get("Parameters", []):
                value = parameter.get("Value", "")
                written = parameter.get("LastModifiedDate")
                if written is not None and written.timestamp() < self.booted:
                    continue
                if value.startswith(FAILED):
                    found.append((self.names[parameter["Name"]], value[len(FAILED) :]))
        if not found:
            return None
        rank, reason = min(found)
        cascade = _CASCADE.match(reason)
        return (int(cascade.group(1)), cascade.group(2)) if cascade else (rank, reason)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            failed = self.poll()
            if failed:
                with self._lock:
                    self.failed = failed
                self.log(f"node {failed[0]} failed ({failed[1]}): stopping this node's fabric run")
                self._terminate()
                return

    def _terminate(self) -> None:
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)

    def attach(self, process: Any) -> None:
        """The fabric run now running (a restart starts a new one)."""
        with self._lock:
            self._process = process
        if self.failed:
            self._terminate()

    @property
    def reason(self) -> str:
        assert self.failed
        return f"node {self.failed[0]} failed ({self.failed[1]})"

    def start(self) -> None:
        if not self.names:
            return  # one node: nobody to watch
        self._thread = threading.Thread(target=self._loop, name="peer-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
