"""The node agent's log line: an ISO timestamp and [fabric-agent], flushed at once."""

from __future__ import annotations

from datetime import UTC, datetime


def log(message: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    print(f"{stamp} [fabric-agent] {message}", flush=True)
