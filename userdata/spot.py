"""Spot interruption notices: IMDS spot/instance-action appears about two minutes ahead.

On a notice the payload's processes get SIGUSR1: the payload checkpoints and exits cleanly, so
the next run resumes from there.
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


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


class SpotWatcher:
    def __init__(self, imds: Imds, interval: float, log: Callable[[str], None]) -> None:
        self.imds = imds
        self.interval = interval
        self.log = log
        self.notice: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fabric_pid: int | None = None
        self._refused = False  # IMDS refuses our tokens; said once, until it answers again

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
            notice = self._poll()
            if notice:
                self.notice = notice
                self.log(f"spot interruption notice: {notice}; asking the payload to checkpoint")
                self._signal_payload()
                return

    def _signal_payload(self) -> None:
        # The workers, not torchrun: SIGUSR1 would end torchrun before they can checkpoint.
        if self._fabric_pid is None:
            return
        for pid in child_pids(self._fabric_pid):
            try:
                os.kill(pid, CHECKPOINT_SIGNAL)
            except ProcessLookupError:
                pass

    def attach(self, fabric_pid: int) -> None:
        """The fabric run now running (a restart starts a new one)."""
        self._fabric_pid = fabric_pid
        if self.notice:
            self._signal_payload()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="spot-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
