"""What a rehearsal tells its user: the one line of a failed check, its log lines, the time
of each phase, and the manifest of what it made (read by a leftover check)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class RehearsalError(RuntimeError):
    """A check that failed; the message is the one line the user sees."""


def log(message: str) -> None:
    print(f"[rehearsal] {message}", flush=True)


class Phases:
    """Times each phase for the final report."""

    def __init__(self) -> None:
        self.durations: list[tuple[str, float, str]] = []

    def run(self, name: str, action: Callable[[], T]) -> T:
        log(f"{name} ...")
        started = time.monotonic()
        try:
            result = action()
        except BaseException:
            self.durations.append((name, time.monotonic() - started, "FAILED"))
            raise
        self.durations.append((name, time.monotonic() - started, "ok"))
        return result

    def report(self) -> None:
        print("\n[rehearsal] phase                              seconds  result", flush=True)
        for name, seconds, result in self.durations:
            print(f"[rehearsal] {name:<34} {seconds:7.1f}  {result}", flush=True)


class Manifest:
    """What the run made, rewritten at each change: a leftover check finds things by the
    names the run itself gave them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.values: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.values.update(values)
        if self.path is not None:  # replaced whole: a reader never sees half of it
            partial = self.path.with_name(f"{self.path.name}.partial")
            partial.write_text(json.dumps(self.values, indent=2))
            partial.replace(self.path)
