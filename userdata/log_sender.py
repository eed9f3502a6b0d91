"""The sending side of the log shipper: events waiting in a bounded buffer (`Buffer`), taken in
batches within CloudWatch's limits and sent to one stream (`Shipper`)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from botocore.exceptions import ClientError, ParamValidationError

from userdata.errors import AgentError
from userdata.log_tail import Event, Mark, event_size, log, now_ms

# CloudWatch Logs limits (PutLogEvents).
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
MAX_BATCH_SPAN_MS = 24 * 3600 * 1000  # from a batch's first event to its last, exclusive

MAX_BACKOFF_SECONDS = 60.0
FLUSH_RETRY_SECONDS = 0.5  # between tries while flushing


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
