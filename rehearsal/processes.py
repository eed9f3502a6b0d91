"""The processes a rehearsal starts: each marked with the run's id and given a TMPDIR in its
work folder, so that everything it started is found and stopped, even a stray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from local.process_groups import stop_groups
from rehearsal.namespaces import EmulatedNetwork
from rehearsal.report import log

# In the environment of every process the rehearsal starts, down to the training workers:
# the one thing they all carry (torchrun starts each worker in a session of its own).
RUN_ID_VARIABLE = "FABRIC_REHEARSAL_ID"
# Shorter than the local cluster's: what a process group leaves after it, the sweep for the
# run's id stops, and a rehearsal keeps no checkpoint of an interrupted run.
STOP_GRACE_SECONDS = 5.0
STRAY_GRACE_SECONDS = 5.0


def run_environment(folder: Path, run_id: str) -> dict[str, str]:
    """What every process the rehearsal starts gets: the run's id and a TMPDIR it removes."""
    return {RUN_ID_VARIABLE: run_id, "TMPDIR": str(folder / "tmp")}


@contextmanager
def work_folder(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="fabric-rehearsal-"))
    try:
        (folder / "tmp").mkdir()  # TMPDIR of everything it starts (torchrun's log folders)
        yield folder
    finally:
        if keep:
            log(f"kept the work folder {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def processes_carrying(variable: str, value: str) -> list[int]:
    """Live processes (not this one) with variable=value in their environment."""
    marker = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive(proc_entry: Path) -> bool:
    try:
        return "\nState:\tZ" not in (proc_entry / "status").read_text()
    except OSError:
        return False


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "(gone)"
    command = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return command or "(exiting)"


def stop_strays(run_id: str, network: EmulatedNetwork) -> list[str]:
    """Stops what stopping the process groups missed; returns one line per stray.

    A worker outlives its node's process group when torchrun dies before stopping it. Strays
    are found by the run's id in their environment, and by being inside the run's namespaces
    (whatever their environment: nothing else is started there).
    """
    pids = sorted(set(processes_carrying(RUN_ID_VARIABLE, run_id)) | set(network.processes()))
    strays = [f"stopped a stray process {pid}: {_command_line(pid)}" for pid in pids]
    for pid in pids:
        _kill(pid, signal.SIGTERM)
        _kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
    deadline = time.monotonic() + STRAY_GRACE_SECONDS
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(Path(f"/proc/{pid}"))]
        time.sleep(0.1)
    # Found again rather than trusted: a pid may have been reused during the grace period.
    ours = set(processes_carrying(RUN_ID_VARIABLE, run_id)) | set(network.processes())
    for pid in ours.intersection(pids):
        _kill(pid, signal.SIGKILL)
    return strays


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class NodeProcesses:
    """Every process started inside the namespaces, each in its own process group."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        command: list[str],
        env: dict[str, str],
        cpu: int | None = None,
        log_path: Path | None = None,
        prefix: str = "",
    ) -> subprocess.Popen[bytes]:
        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pin,
        )
        self.processes.append(process)
        if log_path is not None:
            threading.Thread(target=_relay, args=(process, log_path, prefix), daemon=True).start()
        return process

    def stop_all(self) -> None:
        stop_groups(self.processes, grace=STOP_GRACE_SECONDS)
        self.processes.clear()


def _relay(process: subprocess.Popen[bytes], log_path: Path, prefix: str) -> None:
    assert process.stdout is not None
    with log_path.open("w") as log_file:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            log_file.write(line)
            log_file.flush()
            if "it/s]" not in line:  # progress bars stay in the log file
                sys.stdout.write(f"{prefix}{line}")
                sys.stdout.flush()
