"""Waiting for the GPUs: the driver can come up after the agent starts on a fresh node."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from userdata.errors import AgentError


def count_gpus() -> int | None:
    """GPUs nvidia-smi lists, or None when nvidia-smi is not installed."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return 0
    if result.returncode != 0:
        return 0
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


def wait_for_gpus(
    expected: int,
    timeout: float,
    *,
    interval: float = 5.0,
    log: Callable[[str], None] = print,
) -> int:
    """Returns the GPU count once nvidia-smi sees `expected`; AgentError past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        seen = count_gpus()
        if seen is not None and seen >= expected:
            return seen
        left = deadline - time.monotonic()
        if left <= 0:
            if seen is None:
                raise AgentError(
                    f"nvidia-smi not found within {timeout:g} s: is this a GPU "
                    "image with the NVIDIA driver?"
                )
            raise AgentError(f"nvidia-smi saw {seen} of {expected} GPU(s) within {timeout:g} s")
        log(
            f"waiting for {expected} GPU(s): nvidia-smi sees "
            f"{'nothing (not installed yet)' if seen is None else seen}, {left:.0f} s left"
        )
        time.sleep(min(interval, left))
