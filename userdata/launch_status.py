"""What a node's ranks said about how their script ended (userdata/launch.py writes it), read by
the agent and the local cluster when `fabric run` has exited.

How a script error is told from a fault: the launcher marks a rank as training at its first
optimizer step. A rank that raised before that, with an error that is not torch.distributed's
own (a peer gone, a store timeout), has a script error: an import, its arguments, a mistake
such as `fabric.launch()` under `fabric run`. The same code fails the same way again, so it is
never restarted. Anything else (a fault after training started, a worker killed, a peer lost)
is restarted, and the script resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

STATUS_FILE_PREFIX = "rank-"


@dataclass(frozen=True)
class RankStatus:
    rank: int
    state: str  # started, training, finished, failed, interrupted
    trained: bool
    error: str
    infrastructure: bool

    @property
    def script_error(self) -> bool:
        return self.state == "failed" and not self.trained and not self.infrastructure


@dataclass(frozen=True)
class Outcome:
    """finished: every rank of this node ended its script well (whatever the exit status that
    followed); script_error: the first script error, or ""; error: the first error of any kind."""

    finished: bool
    script_error: str
    error: str


def read_statuses(folder: Path) -> list[RankStatus]:
    statuses = []
    for path in sorted(folder.glob(f"{STATUS_FILE_PREFIX}*.json")):
        try:
            record = json.loads(path.read_text())
            rank = int(path.stem.removeprefix(STATUS_FILE_PREFIX))
        except (OSError, ValueError):
            continue  # torn or foreign: says nothing
        statuses.append(
            RankStatus(
                rank=rank,
                state=str(record.get("state", "")),
                trained=bool(record.get("trained")),
                error=str(record.get("error", "")),
                infrastructure=bool(record.get("infrastructure")),
            )
        )
    return sorted(statuses, key=lambda status: status.rank)


def outcome(folder: Path, ranks: int) -> Outcome:
    """The verdict on one node's `fabric run` of `ranks` processes."""
    statuses = read_statuses(folder)
    finished = len(statuses) == ranks and all(s.state == "finished" for s in statuses)
    script_errors = [s for s in statuses if s.script_error]
    errors = [s for s in statuses if s.state == "failed" and s.error]
    return Outcome(
        finished=finished,
        script_error=script_errors[0].error if script_errors else "",
        error=errors[0].error if errors else "",
    )


def clear(folder: Path) -> None:
    """Before each start of `fabric run`: an earlier attempt's records say nothing of this one."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
