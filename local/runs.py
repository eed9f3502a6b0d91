"""A local run's own records, beside its files in runs/local/<run>/, as node 0 keeps them in S3
(userdata/run_state.py): the script arguments it was started with (fabric-args.json) and its
completion marker (fabric-run.json), with the same rules.

- A run continued without arguments trains with the ones it recorded.
- A run given arguments trains with those and records them.
- A complete run continued with the arguments it ended with (or none) is complete: it is not
  trained again; given other arguments (more epochs) it trains on.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from userdata.run_layout import COMPLETE_MARKER, RUN_ARGS_FILE


def _read(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def recorded_args(run_dir: Path) -> list[str] | None:
    record = _read(run_dir / RUN_ARGS_FILE)
    found = record.get("script_args") if record else None
    if isinstance(found, list) and all(isinstance(arg, str) for arg in found):
        return found
    return None


@dataclass(frozen=True)
class Start:
    script_args: list[str]
    complete: dict[str, Any] | None  # the marker, when the run has ended with these arguments
    note: str  # what the cluster says about the arguments, or ""


def start(run_dir: Path, given: list[str]) -> Start:
    """The arguments this start of the run trains with, and whether it is complete already."""
    recorded = recorded_args(run_dir)
    note = ""
    script_args = given
    if not given and recorded:
        script_args = recorded
        note = f"continues with its recorded arguments: {shlex.join(recorded)}"
    marker = _read(run_dir / COMPLETE_MARKER)
    if marker is not None and marker.get("script_args", []) != script_args:
        before = shlex.join(marker.get("script_args", []))
        note = f"was complete with '{before}'; trains on with '{shlex.join(script_args)}'"
        marker = None
    return Start(script_args, marker, note)


def record_args(run_dir: Path, script_args: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_ARGS_FILE).write_text(json.dumps({"script_args": script_args}) + "\n")


def mark_complete(run_dir: Path, run: str, script_args: list[str]) -> None:
    marker = {"run": run, "status": "complete", "finished": datetime.now(UTC).isoformat()}
    marker["script_args"] = script_args
    (run_dir / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
