"""Spot interruption notices: IMDS spot/instance-action appears about two minutes ahead.

On a notice the payload's processes get SIGUSR1: the payload checkpoints and exits cleanly, so
the next run resumes from there. Only workers that catch SIGUSR1 get it: its default action ends
the process, which would lose everything since the last checkpoint and the rest of the two
minutes (README: "The spot contract").
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from userdata.errors import AgentError
from userdata.imds import Imds, ImdsUnauthorized

NOTICE_PATH = "spot/instance-action"
CHECKPOINT_SIGNAL = signal.SIGUSR1
JOIN_TIMEOUT = 5.0


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


class SpotWatcher:
    def __init__(
        self,
        imds: Imds,
        interval: float,
        log: Callable[[str], None],
        on_notice: Callable[[str], None] | None = None,
    ) -> None:
        """on_notice: called with the notice before the payload is signalled."""
        self.imds = imds
        self.on_notice = on_notice
        self.interval = interval
        self.log = log
        self.notice: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fabric_pid: int | None = None
        self._refused = False  # IMDS refuses our tokens; said once, until it answers again
        self._signalled: set[int] = set()  # workers asked to checkpoint, each once
        self._unhandled: set[int] = set()  # workers without a SIGUSR1 handler, said once

    def _poll(self) -> str | None:
        try:
            notice: str | None = self.imds.get(NOTICE_PATH)
        except KeyError:  # 404: no notice
            notice = None
        except ImdsUnauthorized as error:
            # Not a hiccup: while it lasts no notice can be seen, and no checkpoint is saved.
            if not self._refused:
                self.log(f"spot notices cannot be read: {error}; still looking")
            self._refused = True
            return None
        except AgentError:  # IMDS hiccup: look again later
            return None
        self._refused = False
        return notice

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.notice:
                # A worker still starting up installs its handler later: it is signalled then.
                self.signal_payload()
                continue
            notice = self._poll()
            if notice:
                self.notice = notice
                self.log(f"spot interruption notice: {notice}; asking the payload to checkpoint")
                if self.on_notice:
                    self.on_notice(notice)
                self.signal_payload()

    def signal_payload(self) -> bool:
        """SIGUSR1 to the workers that catch it; not torchrun, which it would end before the
        workers can checkpoint, and not a worker whose script has no handler. Whether any
        worker now running has been asked."""
        if self._fabric_pid is None:
            return False
        workers = child_pids(self._fabric_pid)
        for pid in workers:
            if pid in self._signalled:
                continue
            if not catches(pid, CHECKPOINT_SIGNAL):
                if pid not in self._unhandled:
                    self._unhandled.add(pid)
                    self.log(
                        f"worker {pid} does not handle SIGUSR1: not signalled (it would die at "
                        "once); it trains on until the instance goes"
                    )
                continue
            try:
                os.kill(pid, CHECKPOINT_SIGNAL)
                self._signalled.add(pid)
            except ProcessLookupError:
                pass
        return bool(self._signalled.intersection(workers))

    def attach(self, fabric_pid: int) -> None:
        """The fabric run now running (a restart starts a new one)."""
        self._fabric_pid = fabric_pid
        if self.notice:
            self.signal_payload()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="spot-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=JOIN_TIMEOUT)  # a daemon: a slow IMDS holds nothing up
