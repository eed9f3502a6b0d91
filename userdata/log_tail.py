"""The reading side of the log shipper: log files followed line by line (`Tail`), each line
made an event within CloudWatch's limits, and how far each file has been sent (`Offsets`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

# CloudWatch Logs limits (PutLogEvents).
EVENT_OVERHEAD = 26  # bytes each event counts beyond its UTF-8 message
MAX_EVENT_BYTES = 256 * 1024  # one event, its overhead included

CUT_MARKER = " [log-shipper: line cut]"
READ_CHUNK = 64 * 1024
READ_PER_ROUND = 4 * 1024 * 1024  # per file per round: one busy file cannot starve the rest
HEAD_BYTES = 256  # a file's first bytes, hashed: which file an offset belongs to


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
