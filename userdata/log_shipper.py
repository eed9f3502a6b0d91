"""Ships this node's log files to CloudWatch Logs, one stream per node.

    python -m userdata.log_shipper --log-group GROUP [--stream NAME] [--region R]
        --file PATH [--file PATH ...] [--interval 5] [--max-buffer 10000] [--state-file PATH]

Its own process: training writes its output to files and this only reads them, so a slow or
unreachable CloudWatch can never stall or crash training. Every line of every file becomes one
event (the time it was read, the line itself). The main thread reads the files; a second
thread sends. While CloudWatch cannot be reached, at most --max-buffer lines wait: the oldest
go first, and one note in their place says how many. SIGTERM or SIGINT: the rest of the files
is read, sent for at most FLUSH_SECONDS, and the shipper exits 0.

With --state-file, how far each file has been sent is kept there, written only once CloudWatch
has accepted those lines: a shipper started again (a reboot) goes on from there, so a line is
sent again only if its batch was on its way at a crash, and none is lost. A file truncated or
replaced in the meantime is read from its start.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError

from userdata.errors import AgentError
from userdata.imds import Imds, read_identity
from userdata.run_layout import log_stream

# CloudWatch Logs limits (PutLogEvents).
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26  # bytes each event counts beyond its UTF-8 message
MAX_EVENT_BYTES = 256 * 1024  # one event, its overhead included
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000  # from a batch's first event to its last, exclusive

CUT_MARKER = " [log-shipper: line cut]"
READ_CHUNK = 64 * 1024
READ_PER_ROUND = 4 * 1024 * 1024  # per file per round: one busy file cannot starve the rest
POLL_SECONDS = 0.2  # between looks at files with nothing new
MAX_BACKOFF_SECONDS = 60.0
FLUSH_SECONDS = 5.0  # at stop: the most time spent reading the rest and sending it
FLUSH_RETRY_SECONDS = 0.5  # between tries while flushing
HEAD_BYTES = 256  # a file's first bytes, hashed: which file an offset belongs to
IDENTITY_WAIT_SECONDS = 60.0  # how long IMDS may take to say who this node is
CALL_TIMEOUT_SECONDS = 5.0  # connect and read timeout of each CloudWatch call


def log(message: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    print(f"{stamp} [log-shipper] {message}", file=sys.stderr, flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Mark(NamedTuple):
    """How far one file has been read: the offset just after the last line made into an event,
    in which file. The inode alone does not say: a file written again in place keeps it, and a
    new one may get an old one; hence a hash of its first bytes too. Not the device: an NVMe
    disk's number may change at a reboot (instance store disks enumerated first)."""

    file: str  # the path as given
    inode: int
    head_size: int  # the first bytes hashed (fewer than HEAD_BYTES while the file was shorter)
    head_sha256: str
    offset: int
    cut: bool  # inside a line already sent cut: what follows up to its newline is skipped


class Event(NamedTuple):
    timestamp: int  # ms since the epoch
    message: str
    mark: Mark | None = None  # where its file is read to once this event is sent


def event_size(event: Event) -> int:
    """What an event counts against a batch's byte limit."""
    return len(event.message.encode()) + EVENT_OVERHEAD


def to_message(line: bytes) -> str:
    """A line as an event message: decoded (bad bytes replaced), cut with a marker to fit one
    event, and never empty (CloudWatch refuses empty messages: a blank line is a space)."""
    text = line.decode("utf-8", errors="replace")
    encoded = text.encode()
    limit = MAX_EVENT_BYTES - EVENT_OVERHEAD
    if len(encoded) > limit:
        # Cut the encoded form (a replaced byte takes 3); "ignore" drops a split character.
        keep = limit - len(CUT_MARKER.encode())
        text = encoded[:keep].decode("utf-8", errors="ignore") + CUT_MARKER
    return text or " "


def next_batch(events: Iterable[Event]) -> list[Event]:
    """The oldest events (given in time order) that fit in one PutLogEvents call."""
    batch: list[Event] = []
    size = 0
    for event in events:
        size += event_size(event)
        if (
            len(batch) == MAX_BATCH_EVENTS
            or size > MAX_BATCH_BYTES
            or (batch and event.timestamp - batch[0].timestamp >= MAX_BATCH_SPAN_MS)
        ):
            break
        batch.append(event)
    return batch


def drop_note(count: int) -> str:
    return f"[log-shipper] dropped {count} lines while CloudWatch was unreachable"


class Tail:
    """One file, read from its beginning (or from `resume`, a mark of this same file) and
    followed as it grows, line by line. It may not exist yet; one truncated or replaced
    (rotated) is read again from its start."""

    def __init__(self, path: Path, resume: Mark | None = None) -> None:
        self.path = path
        self.caught_up = True  # the last read reached the end of the file (or it has none)
        self._key = str(path)  # its name in marks
        self._resume = resume  # used at the first open only
        self._file: io.FileIO | None = None  # unbuffered: tell() is where reading goes on
        self._partial = b""  # the last line read, until its newline comes
        self._cut = False  # the partial line was already sent cut: skip to its newline
        self._done = 0  # offset just after the last line made into a message (or skipped)
        self._inode = 0
        self._head = b""  # the file's first HEAD_BYTES, fewer while it is shorter
        self._head_sha256 = hashlib.sha256(b"").hexdigest()

    def mark(self) -> Mark:
        """Where this file is read to: taken just after a message, the end of its line."""
        head_size, sha = len(self._head), self._head_sha256
        return Mark(self._key, self._inode, head_size, sha, self._done, self._cut)

    def _read_head(self) -> None:
        assert self._file is not None
        self._head = os.pread(self._file.fileno(), HEAD_BYTES, 0)
        self._head_sha256 = hashlib.sha256(self._head).hexdigest()  # once, not per line

    def _start(self, offset: int = 0, cut: bool = False) -> None:
        """Reading (again) from `offset` of the open file."""
        assert self._file is not None
        self._file.seek(offset)
        self._done, self._cut, self._partial = offset, cut, b""
        self._inode = os.fstat(self._file.fileno()).st_ino
        self._read_head()

    def _resumes(self, mark: Mark) -> bool:
        """The open file is the one `mark` was taken of, and still holds its lines."""
        assert self._file is not None
        stat = os.fstat(self._file.fileno())
        head = os.pread(self._file.fileno(), mark.head_size, 0)
        return (
            stat.st_ino == mark.inode
            and stat.st_size >= mark.offset
            and len(head) == mark.head_size
            and hashlib.sha256(head).hexdigest() == mark.head_sha256
        )

    def read(self) -> Iterator[str]:
        """Messages of the lines completed since the last call, at most READ_PER_ROUND bytes'
        worth (a generator: the caller buffers as it goes, a backlog never sits in memory)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            stat = None
        if self._file is not None and stat is not None:
            opened = os.fstat(self._file.fileno())
            if (stat.st_dev, stat.st_ino) != (opened.st_dev, opened.st_ino):
                # Replaced: what was written to the old file comes first, to its end.
                yield from self._read(READ_PER_ROUND)
                if not self.caught_up:
                    return
                yield from self.flush()
                self._file.close()
                self._file = None
            elif stat.st_size < self._file.tell():
                yield from self.flush()
                self._start()
        if self._file is None and stat is not None:
            try:
                self._file = open(self.path, "rb", buffering=0)
            except OSError:
                return
            resume, self._resume = self._resume, None
            if resume is not None and self._resumes(resume):
                self._start(resume.offset, resume.cut)
            else:
                self._start()
        if self._file is not None:
            if len(self._head) < HEAD_BYTES:  # it was shorter: a stronger hash now
                self._read_head()
            yield from self._read(READ_PER_ROUND)

    def _read(self, limit: int) -> Iterator[str]:
        assert self._file is not None
        done = 0
        self.caught_up = False
        while done < limit:
            chunk = self._file.read(READ_CHUNK)
            if not chunk:
                self.caught_up = True
                return
            done += len(chunk)
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            # The state is updated before each yield: mark() is taken while the caller holds
            # the message.
            for line in lines:
                skip, self._cut = self._cut, False
                self._done += len(line) + 1
                if not skip:
                    yield to_message(line.removesuffix(b"\r"))
            if len(self._partial) > MAX_EVENT_BYTES:
                # A line with no end in sight (a progress bar's \r): send it cut now.
                partial, skip = self._partial, self._cut
                self._partial, self._cut = b"", True
                self._done += len(partial)
                if not skip:
                    yield to_message(partial)

    def flush(self) -> Iterator[str]:
        """The unfinished last line, as it is (at stop, or when the file starts over). Its
        bytes count as read: what comes after them is a line of its own."""
        partial, self._partial = self._partial, b""
        skip, self._cut = self._cut, False
        self._done += len(partial)
        if partial and not skip:
            yield to_message(partial.removesuffix(b"\r"))


class Buffer:
    """Events waiting to be sent, oldest first, at most `limit`: when full the oldest goes and
    is counted. Shared by the reading thread (add) and the sending thread (take, then done or
    put_back)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0  # lines dropped since the last note about them was sent
        self._events: deque[Event] = deque()
        self._lock = threading.Lock()
        self._last_ms = 0
        # The batch being sent holds the oldest lines: when the buffer is full they are the
        # ones to drop, but only if the send fails (else they have arrived).
        self._in_flight = 0
        self._in_flight_dropped = 0
        self._note_in_flight = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def empty(self) -> bool:
        with self._lock:
            return not self._events and not self.dropped

    def add(self, message: str, timestamp: int | None = None, mark: Mark | None = None) -> None:
        with self._lock:
            # PutLogEvents wants time order; the clock may step back (NTP).
            self._last_ms = max(now_ms() if timestamp is None else timestamp, self._last_ms)
            self._events.append(Event(self._last_ms, message, mark))
            if len(self._events) + self._in_flight - self._in_flight_dropped > self.limit:
                if self._in_flight_dropped < self._in_flight:
                    self._in_flight_dropped += 1
                else:
                    self._events.popleft()
                    self.dropped += 1

    def take(self) -> list[Event]:
        """The next batch, out of the buffer: first a note if lines were dropped."""
        with self._lock:
            notes: list[Event] = []
            if self.dropped:
                first = self._events[0].timestamp if self._events else self._last_ms
                notes = [Event(first, drop_note(self.dropped))]
            batch = next_batch(itertools.chain(notes, self._events))
            self._in_flight = len(batch) - len(notes)
            for _ in range(self._in_flight):
                self._events.popleft()
            self._note_in_flight, self.dropped = self.dropped, 0
            self._in_flight_dropped = 0
            return batch

    def done(self) -> None:
        """The batch taken has been sent (or given up)."""
        with self._lock:
            self._in_flight = self._in_flight_dropped = self._note_in_flight = 0

    def put_back(self, batch: list[Event]) -> None:
        """The batch taken was not sent: it is the oldest again, less what no longer fits."""
        with self._lock:
            lines = batch[1:] if self._note_in_flight else batch
            self._events.extendleft(reversed(lines[self._in_flight_dropped :]))
            self.dropped += self._note_in_flight + self._in_flight_dropped
            self._in_flight = self._in_flight_dropped = self._note_in_flight = 0


class Offsets:
    """How far each file has been sent, in a small JSON file (None: nowhere). Written after
    each batch CloudWatch accepted, to a temporary file renamed over the old one: a crash
    leaves the old state or the new one, never half of one."""

    def __init__(self, path: Path | None, log: Callable[[str], None] = log) -> None:
        self.path = path
        self.log = log
        self.marks: dict[str, Mark] = {}
        self._failed = False  # a write failed: said once

    def load(self) -> dict[str, Mark]:
        """The saved marks by file; none (every file read from its start) if there are none or
        they cannot be read: lines sent twice rather than lost."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            files = json.loads(self.path.read_text())["files"]
            self.marks = {file: Mark(file, **fields) for file, fields in files.items()}
            for mark in self.marks.values():  # a wrong type would crash the reading later
                if list(map(type, mark)) != [str, int, int, str, int, bool]:
                    raise ValueError(f"not a mark: {mark}")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            self.log(f"cannot read {self.path} ({error!r}): every file is sent from its start")
            self.marks = {}
        return dict(self.marks)

    def commit(self, batch: Iterable[Event]) -> None:
        """The batch has been accepted: its files are sent up to its last line of each."""
        latest = {event.mark.file: event.mark for event in batch if event.mark is not None}
        if self.path is None or not latest:
            return
        self.marks.update(latest)
        files = {file: mark._asdict() for file, mark in self.marks.items()}
        for fields in files.values():
            del fields["file"]
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with temporary.open("w") as file:
                json.dump({"files": files}, file)
                file.flush()
                os.fsync(file.fileno())  # else a power loss may leave the new name empty
            os.replace(temporary, self.path)
        except OSError as error:
            if not self._failed:
                self.log(f"cannot write {self.path} (said once): {error}")
            self._failed = True


def error_code(error: Exception) -> str | None:
    return error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None


class Shipper:
    """Sends the buffer to one stream in batches; failures are retried with backoff, told
    once per streak, and never raised."""

    def __init__(
        self,
        client: Any,
        group: str,
        stream: str,
        buffer: Buffer,
        interval: float = 5.0,
        log: Callable[[str], None] = log,
        on_sent: Callable[[list[Event]], None] = lambda _batch: None,
    ) -> None:
        self.client = client
        self.group = group
        self.stream = stream
        self.buffer = buffer
        self.interval = interval
        self.log = log
        self.on_sent = on_sent  # a batch CloudWatch accepted (or refused for good)
        self.failures = 0  # in a row
        self.rejected = False  # CloudWatch has rejected events for their time

    def backoff(self) -> float:
        """Seconds until the next send: the interval, doubled for each failure in a row."""
        if not self.failures:
            return self.interval
        return min(self.interval * 2.0**self.failures, MAX_BACKOFF_SECONDS)

    def _put(self, batch: list[Event]) -> None:
        events = [{"timestamp": e.timestamp, "message": e.message} for e in batch]
        put = {"logGroupName": self.group, "logStreamName": self.stream, "logEvents": events}
        try:
            self._check(self.client.put_log_events(**put))
            return
        except ClientError as error:
            if error_code(error) != "ResourceNotFoundException":
                raise
        # The stream is made on first use (a node made again finds its stream still there).
        try:
            self.client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
        except ClientError as error:
            if error_code(error) == "ResourceNotFoundException":  # the stack makes it
                raise AgentError(f"log group {self.group} does not exist") from None
            if error_code(error) != "ResourceAlreadyExistsException":
                raise
        self._check(self.client.put_log_events(**put))

    def _check(self, answer: dict[str, Any]) -> None:
        # Events too old (beyond the retention or 14 days) or too new (2 h ahead): the clock.
        rejected = answer.get("rejectedLogEventsInfo")
        if rejected and not self.rejected:
            self.log(f"CloudWatch rejected some events (said once): {rejected}")
        self.rejected = self.rejected or bool(rejected)

    def send_batch(self) -> bool:
        """One PutLogEvents call with the oldest events; False when it failed."""
        batch = self.buffer.take()
        if not batch:
            return True
        try:
            self._put(batch)
        except Exception as error:  # whatever it is (ClientError, BotoCoreError...): live on
            refused = error_code(error) == "InvalidParameterException"
            if refused or isinstance(error, ParamValidationError):
                # Sending it again would fail again and hold up every line after it.
                self.log(f"CloudWatch refused {len(batch)} lines, not sent: {error}")
                self.buffer.done()
                self.on_sent(batch)  # done with: after a restart it would fail again
                return True
            self.buffer.put_back(batch)
            if not self.failures:
                self.log(f"cannot send to CloudWatch, buffering and retrying: {error}")
            self.failures += 1
            return False
        self.buffer.done()
        self.on_sent(batch)
        if self.failures:
            self.log(f"sending again after {self.failures} failed tries")
        self.failures = 0
        return True

    def run(self, finishing: threading.Event) -> None:
        """Sends every `interval`; once `finishing`, until the buffer is empty."""
        while True:
            finished = finishing.is_set()
            while not self.buffer.empty() and self.send_batch():
                pass
            if finished and self.buffer.empty():
                return
            if finished:
                time.sleep(FLUSH_RETRY_SECONDS)
            else:
                finishing.wait(self.backoff())


def stream_and_region(
    stream: str | None,
    region: str | None,
    imds: Imds,
    wait: float = IDENTITY_WAIT_SECONDS,
    stop: threading.Event | None = None,
    stack: str = "",
) -> tuple[str, str | None]:
    """The stream (`<stack>/node-<rank>`, the rank from the instance tags) and region not given,
    from IMDS, which is asked again for `wait` seconds (or until `stop`). A rank that cannot be
    read gives the instance id, so the logs of a node whose tags are broken still arrive."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + wait
    while not (stream and region):
        try:
            if stream:
                region = imds.require("placement/region")
            else:
                identity = read_identity(imds)
                stream = log_stream(identity.node_rank, stack)
                region = region or identity.region
        except AgentError as error:
            left = deadline - time.monotonic()
            if left > 0 and not stop.wait(min(left, 2.0)):
                continue
            if not stream:
                log(f"no node rank ({error}): the stream is named by the instance id")
            try:
                stream = stream or imds.require("instance-id")
                region = region or imds.require("placement/region")
            except AgentError as again:
                log(f"IMDS cannot say who this node is ({again})")
                stream = stream or socket.gethostname()
            break
    return stream, region  # region None: boto3's own (AWS_REGION, AWS_DEFAULT_REGION...)


def logs_client(region: str | None) -> Any:
    """Short timeouts and one retry: a call never blocks for minutes. Honours
    AWS_ENDPOINT_URL (boto3 reads it), so tests stay local."""
    config = Config(
        connect_timeout=CALL_TIMEOUT_SECONDS,
        read_timeout=CALL_TIMEOUT_SECONDS,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client("logs", region_name=region, config=config)


def ship(
    args: argparse.Namespace, buffer: Buffer, offsets: Offsets, finishing: threading.Event
) -> None:
    """The sending thread: who this node is, then send until finished."""
    try:
        stream, region = args.stream, args.region
        if not (stream and region):
            stream, region = stream_and_region(
                stream, region, Imds(), stop=finishing, stack=args.stack
            )
        client = logs_client(region)
    except Exception as error:  # no region anywhere, say: the files are still read
        log(f"nothing will be sent: {error}")
        return
    log(f"sending {', '.join(args.file)} to {args.log_group}/{stream}")
    shipper = Shipper(client, args.log_group, stream, buffer, args.interval, on_sent=offsets.commit)
    shipper.run(finishing)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m userdata.log_shipper",
        description="Send the lines of log files to a CloudWatch Logs stream as they come.",
    )
    parser.add_argument("--log-group", required=True)
    parser.add_argument(
        "--stream",
        help="the stream (default: <stack>/node-<rank>, the rank from the instance tags)",
    )
    parser.add_argument(
        "--stack", default="", help="the cluster's stack: its streams in the shared log group"
    )
    parser.add_argument("--region", help="default: the instance's region, from IMDS")
    parser.add_argument(
        "--file",
        action="append",
        required=True,
        help="a file to follow from its beginning (again for more); it may appear later",
    )
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between sends")
    parser.add_argument(
        "--max-buffer",
        type=int,
        default=10_000,
        help="lines kept while CloudWatch cannot be reached; beyond it the oldest go",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        help="where how far each file was sent is kept, to go on from there after a restart",
    )
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be above 0")
    if args.max_buffer < 1:
        parser.error("--max-buffer must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    buffer = Buffer(args.max_buffer)
    offsets = Offsets(args.state_file)
    saved = offsets.load()
    tails = [Tail(Path(path), saved.get(str(Path(path)))) for path in args.file]
    finishing = threading.Event()
    # A daemon: a send stuck at stop cannot hold the exit up.
    sender = threading.Thread(target=ship, args=(args, buffer, offsets, finishing), daemon=True)
    sender.start()
    while not stop.is_set():
        for tail in tails:
            for message in tail.read():
                buffer.add(message, mark=tail.mark())
        if all(tail.caught_up for tail in tails):
            stop.wait(POLL_SECONDS)
    deadline = time.monotonic() + FLUSH_SECONDS
    for tail in tails:
        while time.monotonic() < deadline:
            for message in tail.read():
                buffer.add(message, mark=tail.mark())
            if tail.caught_up:
                break
        for message in tail.flush():
            buffer.add(message, mark=tail.mark())
    finishing.set()
    sender.join(max(deadline - time.monotonic(), 0.1))
    if sender.is_alive():
        log(f"stopping with {len(buffer)} lines not sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
