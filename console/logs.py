"""`logs`: the nodes' CloudWatch Logs streams (`node-<rank>`, one line of boot log, agent or
training output per event), merged in time order with `[node R] ` before each line;
`--follow` polls for new events until Ctrl-C."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from botocore.exceptions import ClientError

from console import utc_now
from console.aws import Aws, ConsoleError, Stack, error_code
from userdata.run_layout import LOG_STREAM_PREFIX, log_stream

DURATION_PART = re.compile(r"(\d+)([smhdw])")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
STREAM = re.compile(rf"^{re.escape(LOG_STREAM_PREFIX)}(\d+)$")
POLL_S = 2.0
# CloudWatch may make an event visible after later ones: each poll looks back this far and
# drops the events it has already shown (by eventId).
LATE_MS = 60_000


@dataclass(frozen=True)
class LogEvent:
    rank: int
    timestamp: int  # milliseconds since the epoch, the node's own clock
    event_id: str
    message: str


def parse_since(text: str) -> timedelta | None:
    """`30s`, `10m`, `1h`, `2d`, `1w` or combinations (`1h30m`); `all` for no limit."""
    compact = text.strip().lower().replace(" ", "")
    if compact in ("all", "0"):
        return None
    parts = DURATION_PART.findall(compact)
    if not parts or "".join(number + unit for number, unit in parts) != compact:
        raise ConsoleError(
            f"--since {text!r}: expected a duration like 30m, 1h, 2d or 1h30m, or all"
        )
    return timedelta(seconds=sum(int(number) * SECONDS[unit] for number, unit in parts))


def stream_name(rank: int) -> str:
    return log_stream(rank)


def stream_rank(name: str) -> int | None:
    match = STREAM.match(name)
    return int(match.group(1)) if match else None


def merge(events: Iterable[LogEvent]) -> list[LogEvent]:
    """Time order across nodes; a stable sort keeps each stream's own order within one ms."""
    return sorted(events, key=lambda event: event.timestamp)


def format_event(event: LogEvent) -> str:
    lines = event.message.rstrip("\r\n").splitlines() or [""]
    return "\n".join(f"[node {event.rank}] {line}" for line in lines)


def _group_error(error: ClientError, group: str, region: str) -> Exception:
    if error_code(error) == "ResourceNotFoundException":
        return ConsoleError(
            f"no log group {group} in region {region}: it was deleted, or the stack is not "
            "deployed there (make deploy)"
        )
    return error


def existing_streams(aws: Aws, group: str) -> set[str]:
    names: set[str] = set()
    try:
        for page in (
            aws.client("logs")
            .get_paginator("describe_log_streams")
            .paginate(logGroupName=group, logStreamNamePrefix=LOG_STREAM_PREFIX)
        ):
            names.update(stream["logStreamName"] for stream in page.get("logStreams", []))
    except ClientError as error:
        raise _group_error(error, group, aws.region) from error
    return names


def fetch(aws: Aws, group: str, streams: list[str], start_ms: int | None) -> list[LogEvent]:
    if not streams:
        return []  # filter_log_events without names would read every stream in the group
    arguments: dict[str, object] = {"logGroupName": group, "logStreamNames": streams}
    if start_ms is not None:
        arguments["startTime"] = start_ms
    events = []
    try:
        for page in aws.client("logs").get_paginator("filter_log_events").paginate(**arguments):
            for item in page.get("events", []):
                rank = stream_rank(item.get("logStreamName", ""))
                if rank is None:
                    continue
                events.append(
                    LogEvent(rank, int(item["timestamp"]), item["eventId"], item["message"])
                )
    except ClientError as error:
        raise _group_error(error, group, aws.region) from error
    return events


def run_logs(
    aws: Aws,
    stack: Stack,
    node: int | None,
    follow: bool,
    since: timedelta | None,
    echo: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    group = stack.log_group
    num_nodes = len(stack.instance_ids)
    if node is not None and node >= num_nodes:
        raise ConsoleError(f"no node {node} in stack {stack.name} (nodes 0..{num_nodes - 1})")
    wanted = [stream_name(rank) for rank in ([node] if node is not None else range(num_nodes))]
    start = int((utc_now() - since).timestamp() * 1000) if since else None
    shown: dict[str, int] = {}  # eventId -> timestamp, for the look-back window only
    streams: list[str] = []
    try:
        while True:
            if len(streams) < len(wanted):  # a node's stream appears with its first event
                present = existing_streams(aws, group)
                streams = [name for name in wanted if name in present]
                if node is not None and not streams and not follow:
                    raise ConsoleError(
                        f"no log stream {wanted[0]} in {group}: node {node} has not logged "
                        "anything yet (--follow waits for it)"
                    )
            events = [
                event for event in fetch(aws, group, streams, start) if event.event_id not in shown
            ]
            for event in merge(events):
                echo(format_event(event))
                shown[event.event_id] = event.timestamp
            if not follow:
                return 0
            if shown:
                start = max(start or 0, max(shown.values()) - LATE_MS)
                shown = {key: stamp for key, stamp in shown.items() if stamp >= start}
            sleep(POLL_S)
    except KeyboardInterrupt:
        return 0
