"""Secrets' values masked in what the node shows: the script's output (which the agent passes
on to agent.log, the journal, the console and CloudWatch Logs) and the phases."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable
from typing import BinaryIO, TextIO
from urllib.parse import quote, quote_plus

MASK = "********"
MIN_LENGTH = 4  # shorter values would mask ordinary text; such a value is no secret anyway
LINE_ENDS = (b"\n", b"\r")  # \r: progress bars redraw their line
HOLD_LIMIT = 64 * 1024  # a line longer than this goes out in pieces


def forms(value: str) -> set[str]:
    """The ways a script may print a value: as it is, a line at a time (a key file), escaped
    as repr or JSON would, URL-encoded (a password in a connection string), and each string
    field of a JSON object (Secrets Manager's usual form). Best effort: base64 is not caught."""
    found = {value, *value.splitlines()}
    try:
        fields = json.loads(value)
    except ValueError:
        fields = None
    if isinstance(fields, dict):
        found |= {item for item in fields.values() if isinstance(item, str)}
    for each in list(found):
        found |= {
            json.dumps(each)[1:-1],
            json.dumps(each, ensure_ascii=False)[1:-1],
            repr(each)[1:-1],
            quote(each, safe=""),
            quote_plus(each),
        }
    return found


class Masker:
    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values: list[bytes] = []
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        found = set(self.values)
        for value in values:
            for form in forms(value):
                if len(form.strip()) >= MIN_LENGTH:
                    found.add(form.strip().encode())
        self.values = sorted(found, key=len, reverse=True)  # the longest first

    def __bool__(self) -> bool:
        return bool(self.values)

    def mask_bytes(self, data: bytes) -> bytes:
        for value in self.values:
            data = data.replace(value, MASK.encode())
        return data

    def mask(self, text: str) -> str:
        return self.mask_bytes(text.encode()).decode(errors="replace") if self.values else text


class MaskedStream:
    """The agent's own stdout or stderr, masked: an error that quotes the script's last line."""

    def __init__(self, stream: TextIO, masker: Masker) -> None:
        self.stream = stream
        self.masker = masker

    def write(self, text: str) -> int:
        self.stream.write(self.masker.mask(text))
        return len(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def mask_own_output(masker: Masker) -> None:
    if not isinstance(sys.stdout, MaskedStream):
        sys.stdout = MaskedStream(sys.stdout, masker)  # type: ignore[assignment]
        sys.stderr = MaskedStream(sys.stderr, masker)  # type: ignore[assignment]


def pump(source: BinaryIO, sink: int, masker: Masker) -> None:
    """Copies a child's output to the file descriptor sink, masked, a line at a time (a value
    split across reads is still caught), until the child closes it."""
    held = b""
    fd = source.fileno()
    sink_open = True
    while chunk := os.read(fd, 65536):
        held += chunk
        cut = max(held.rfind(end) for end in LINE_ENDS) + 1
        if cut == 0 and len(held) > HOLD_LIMIT:
            longest = max(len(value) for value in masker.values)
            cut = _outside_values(held, len(held) - longest, masker)
        if cut > 0:
            # A sink gone (the tee killed) must not fill the pipe and block the ranks: drain.
            sink_open = sink_open and _write(sink, masker.mask_bytes(held[:cut]))
            held = held[cut:]
    if held and sink_open:
        _write(sink, masker.mask_bytes(held))


def _outside_values(data: bytes, cut: int, masker: Masker) -> int:
    """cut, moved back to the start of any value that it would split."""
    moved = True
    while moved:
        moved = False
        for value in masker.values:
            start = data.find(value, max(0, cut - len(value) + 1))
            if 0 <= start < cut < start + len(value):
                cut, moved = start, True
    return cut


def _write(fd: int, data: bytes) -> bool:
    """Whether the sink took it all."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        return False
    return True


def start_pump(source: BinaryIO, sink: int, masker: Masker) -> threading.Thread:
    thread = threading.Thread(target=pump, args=(source, sink, masker), daemon=True, name="mask")
    thread.start()
    return thread
