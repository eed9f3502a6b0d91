"""Stopping processes started with start_new_session=True, each with everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence

STOP_GRACE_SECONDS = 10.0


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def stop_groups(
    processes: Sequence[subprocess.Popen[bytes]], grace: float = STOP_GRACE_SECONDS
) -> None:
    """SIGTERM every process group, SIGKILL what is left after a shared grace period."""
    for process in processes:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        signal_group(process, signal.SIGKILL)  # also reaps workers whose leader already exited
        process.wait()
