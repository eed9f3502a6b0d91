"""`logs`: the nodes' CloudWatch Logs streams (`<stack>/node-<rank>`, one line of boot log, agent or
training output per event), merged in time order with `[node R] ` before each line;
`--follow` polls for new events until Ctrl-C.

FilterLogEvents allows 5 calls a second per account, so: each page is printed as it arrives
(time order within the page; CloudWatch returns the streams interleaved by time), the
clients back off on throttling, and a throttled poll in `--follow` waits and tries again
instead of ending the command. A node's log shipper batches and backs off up to 60 s, so an
event with timestamp T may become visible a minute or more after T: each poll looks back
OVERLAP_MS before the newest event shown and drops the events already shown, by eventId
(a set that keeps only the ids inside the window, and at most MAX_SEEN of them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from botocore.exceptions import ClientError

from console import utc_now
from console.aws import Aws, ConsoleError, Stack, error_code, is_throttled
from userdata.run_layout import LOG_STREAM_PREFIX, log_stream

DURATION_PART = re.compile(r"(\d+)([smhdw])")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
STREAM = re.compile(rf"(?:^|/){re.escape(LOG_STREAM_PREFIX)}(\d+)$")
POLL_S = 2.0
MAX_POLL_S = 60.0  # the longest wait after throttled polls, doubling from POLL_S
OVERLAP_MS = 120_000  # the shipper's 60 s of backoff, and as much again for ingestion
MAX_SEEN = 100_000  # eventIds kept: past this many lines in OVERLAP_MS, some may repeat


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


def stream_name(rank: int, stack: str) -> str:
    return log_stream(rank, stack)


def stream_rank(name: str) -> int | None:
    match = STREAM.search(name)
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


def existing_streams(aws: Aws, group: str, stack: str) -> set[str]:
    names: set[str] = set()
    try:
        for page in (
            aws.client("logs")
            .get_paginator("describe_log_streams")
            .paginate(logGroupName=group, logStreamNamePrefix=f"{stack}/{LOG_STREAM_PREFIX}")
        ):
            names.update(stream["logStreamName"] for stream in page.get("logStreams", []))
    except ClientError as error:
        raise _group_error(error, group, aws.region) from error
    return names


def pages(
    aws: Aws, group: str, streams: list[str], start_ms: int | None
) -> Iterator[list[LogEvent]]:
    """FilterLogEvents page by page, each as it arrives."""
    if not streams:
        return  # filter_log_events without names would read every stream in the group
    arguments: dict[str, object] = {"logGroupName": group, "logStreamNames": streams}
    if start_ms is not None:
        arguments["startTime"] = start_ms
    logs = aws.client("logs")
    while True:
        try:
            answer = logs.filter_log_events(**arguments)
        except ClientError as error:
            raise _group_error(error, group, aws.region) from error
        events = []
        for item in answer.get("events", []):
            rank = stream_rank(item.get("logStreamName", ""))
            if rank is not None:
                events.append(
                    LogEvent(rank, int(item["timestamp"]), item["eventId"], item["message"])
                )
        yield events
        token = answer.get("nextToken")
        if not token:
            return
        arguments["nextToken"] = token


@dataclass
class Seen:
    """The events already printed (eventId -> timestamp), for the look-back window only."""

    ids: dict[str, int] = field(default_factory=dict)
    newest: int | None = None  # the newest timestamp printed

    def add(self, event: LogEvent) -> None:
        self.ids[event.event_id] = event.timestamp
        if self.newest is None or event.timestamp > self.newest:
            self.newest = event.timestamp
        if len(self.ids) > MAX_SEEN:
            del self.ids[next(iter(self.ids))]  # the one printed first

    def forget_before(self, start_ms: int) -> None:
        self.ids = {key: stamp for key, stamp in self.ids.items() if stamp >= start_ms}


def run_logs(
    aws: Aws,
    stack: Stack,
    node: int | None,
    follow: bool,
    since: timedelta | None,
    echo: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    warn: Callable[[str], None] = lambda text: None,
) -> int:
    group = stack.log_group
    num_nodes = len(stack.instance_ids)
    if node is not None and node >= num_nodes:
        raise ConsoleError(f"no node {node} in stack {stack.name} (nodes 0..{num_nodes - 1})")
    ranks = [node] if node is not None else range(num_nodes)
    wanted = [stream_name(rank, stack.name) for rank in ranks]
    start = int((utc_now() - since).timestamp() * 1000) if since else None
    seen = Seen()
    streams: list[str] = []
    pause = POLL_S
    try:
        while True:
            try:
                if len(streams) < len(wanted):  # a node's stream appears with its first event
                    present = existing_streams(aws, group, stack.name)
                    streams = [name for name in wanted if name in present]
                    if node is not None and not streams and not follow:
                        raise ConsoleError(
                            f"no log stream {wanted[0]} in {group}: node {node} has not logged "
                            "anything yet (--follow waits for it)"
                        )
                for page in pages(aws, group, streams, start):
                    for event in merge(e for e in page if e.event_id not in seen.ids):
                        echo(format_event(event))
                        seen.add(event)
            except ClientError as error:
                if not (follow and is_throttled(error)):
                    raise
                pause = min(pause * 2, MAX_POLL_S)  # what was printed is in seen: not again
                warn(f"(CloudWatch Logs throttled the poll; trying again in {pause:g}s)")
            else:
                pause = POLL_S
            if not follow:
                return 0
            if seen.newest is not None:
                start = max(start or 0, seen.newest - OVERLAP_MS)
                seen.forget_before(start)
            sleep(pause)
    except KeyboardInterrupt:
        return 0
