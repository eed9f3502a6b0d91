"""The thin launcher `fabric run` starts on every rank, in front of the user's script.

    fabric run [options] launch.py -- SCRIPT [ARGS...]
    fabric run [options] launch.py -- -m MODULE [ARGS...]

It runs the script as `python SCRIPT ARGS` would (same sys.argv, sys.path[0], __main__), or a
module as `python -m MODULE` would (which `fabric run` cannot start itself), and adds:

- a record per rank in $FABRIC_LAUNCH_STATUS_DIR (rank-<RANK>.json, when that is set): whether
  the script finished, or failed before its first optimizer step (a script error: import,
  arguments, `fabric.launch()` twice; never worth a restart) or after it (a fault: a restart
  resumes from a checkpoint), with the error's last line; see userdata/launch_status.py;
- a clean end: a script that returns without `destroy_process_group()` (most do) would now and
  then abort at interpreter exit on a non-zero node (`terminate called without an active
  exception`, a gloo thread torn down under a closed peer socket): the group is destroyed here;
- a common end: a rank that finished waits until every rank has recorded its end (or
  FINISH_WAIT), so that no rank leaves first. A rank that left and then died at interpreter
  exit would make torchrun kill its peers still in their last lines (a final save, a log), and
  a peer killed before its record reads as a fault: the finished run would be restarted.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import TextIO

STATUS_DIR_ENV = "FABRIC_LAUNCH_STATUS_DIR"
# How long a rank that finished waits for the others (their final save, an upload) before it
# leaves without them; what it recorded stays either way.
FINISH_WAIT = timedelta(minutes=2)
FINISHED_KEY = "fabric-launch/finished"
# Known mistakes, by a pattern of the error's line, and their fix.
KNOWN_MISTAKES = {
    re.compile(r"Calling\s+`\.launch\(\)` again is not allowed"): "under `fabric run`, leave "
    "out fabric.launch() (fabric run has started the processes already)",
}


class LastLine:
    """stderr as it was, remembering its last non-empty line (argparse's `error: ...`)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            self.last = lines[-1]
        return self.stream.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


class Status:
    """This rank's record: started, training (after the first optimizer step), and the end."""

    def __init__(self, folder: str | None, rank: str) -> None:
        self.path = Path(folder) / f"rank-{rank}.json" if folder else None
        self.trained = False

    def write(self, state: str, error: str = "", infrastructure: bool = False) -> None:
        if self.path is None:
            return
        record = {
            "state": state,
            "trained": self.trained,
            "error": error,
            "infrastructure": infrastructure,
        }
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(record) + "\n")
            partial.replace(self.path)
        except OSError as failure:  # a record is help, never a reason to fail the rank
            print(f"[fabric-launch] cannot write {self.path}: {failure}", file=sys.__stderr__)

    def watch_training(self) -> None:
        """The first optimizer step (any torch optimizer, Fabric's or not) marks training."""
        try:
            from torch.optim.optimizer import register_optimizer_step_post_hook
        except ImportError:  # no torch: the script fails on its own, at setup
            return

        def first_step(*_args: object) -> None:
            handle.remove()
            self.trained = True
            self.write("training")

        handle = register_optimizer_step_post_hook(first_step)


def error_line(error: BaseException, stderr: LastLine) -> str:
    """One line: the exception as Python's last traceback line, or, for a SystemExit, what the
    script said last on stderr (argparse's error) with its status."""
    if isinstance(error, SystemExit):
        said = f": {stderr.last}" if stderr.last else ""
        return f"exited with status {error.code}{said}"
    line = " ".join(traceback.format_exception_only(type(error), error)[-1].split())
    for pattern, fix in KNOWN_MISTAKES.items():
        if pattern.search(line):
            return f"{line} (fix: {fix})"
    return line


def is_infrastructure(error: BaseException) -> bool:
    """torch.distributed's own errors (a peer gone, a store timeout) are faults of the cluster,
    not of the script, even before the first step."""
    distributed = sys.modules.get("torch.distributed")
    kind = getattr(distributed, "DistError", None)
    return isinstance(kind, type) and isinstance(error, kind)


def destroy_process_group() -> None:
    distributed = sys.modules.get("torch.distributed")
    try:
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()
    except Exception as error:  # the script is done: its end must stay clean
        print(f"[fabric-launch] destroy_process_group: {error}", file=sys.__stderr__)


def wait_for_peers(timeout: timedelta = FINISH_WAIT) -> None:
    """A barrier on torchrun's own store (MASTER_ADDR:MASTER_PORT, there whether or not the
    script made a process group): every rank counts itself in, the last one opens the gate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world <= 1 or not address or not port:
        return
    # One count per torchrun attempt: a store that outlived a restart has the last one's.
    key = f"{FINISHED_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        from torch.distributed import TCPStore

        store = TCPStore(address, int(port), is_master=False, timeout=timeout)
        if store.add(key, 1) >= world:
            store.set(f"{key}/all", "1")
        store.wait([f"{key}/all"])
    except Exception as error:  # the script is done: waiting is a courtesy to the others
        rank = os.environ.get("RANK", "?")
        print(
            f"[fabric-launch] rank {rank} finished; not every rank did within "
            f"{timeout.total_seconds():g} s, leaving without them ({' '.join(str(error).split())})",
            file=sys.__stderr__,
        )


def target(argv: list[str]) -> tuple[str, str, list[str]]:
    """("script", path, args) or ("module", name, args) from the launcher's own arguments."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if argv[:1] == ["-m"] and len(argv) >= 2:
        return "module", argv[1], argv[2:]
    if argv and argv[0].startswith("-m") and len(argv[0]) > 2:
        return "module", argv[0][2:], argv[1:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: launch.py [--] SCRIPT [ARGS...] | [--] -m MODULE [ARGS...]")
    return "script", argv[0], argv[1:]


def run(kind: str, name: str, args: list[str]) -> None:
    if kind == "module":
        sys.argv = [name, *args]  # runpy sets argv[0] to the module's file
        sys.path[0] = os.getcwd()  # as `python -m`: the working directory first
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [name, *args]
        sys.path[0] = str(Path(name).resolve().parent)  # as `python SCRIPT`: its folder first
        runpy.run_path(name, run_name="__main__")


def main() -> int:
    kind, name, args = target(sys.argv[1:])
    status = Status(os.environ.get(STATUS_DIR_ENV), os.environ.get("RANK", "0"))
    stderr = LastLine(sys.stderr)
    sys.stderr = stderr
    status.write("started")
    status.watch_training()
    try:
        run(kind, name, args)
    except BaseException as error:
        if not (isinstance(error, SystemExit) and error.code in (None, 0)):
            if isinstance(error, KeyboardInterrupt):
                status.write("interrupted", "KeyboardInterrupt")
            else:
                status.write("failed", error_line(error, stderr), is_infrastructure(error))
            raise
    status.write("finished")
    wait_for_peers()
    destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
