"""The launcher in front of every script (userdata/launch.py) and what the agent and the local
cluster read of it (userdata/launch_status.py): run here as torchrun would run it, one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from userdata.fabric_command import LAUNCH_SCRIPT
from userdata.launch import FINISHED_KEY, wait_for_peers
from userdata.launch_status import outcome, read_statuses

ONE_STEP = """\
import torch
weight = torch.nn.Parameter(torch.zeros(1))
torch.optim.SGD([weight], lr=0.1).step()
"""


def launch(
    folder: Path, *target: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "FABRIC_LAUNCH_STATUS_DIR": str(folder / "status"), "RANK": "3"}
    return subprocess.run(
        [sys.executable, str(LAUNCH_SCRIPT), "--", *target],
        cwd=cwd or folder,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def record(folder: Path) -> dict[str, object]:
    return json.loads((folder / "status" / "rank-3.json").read_text())


def script(folder: Path, text: str, name: str = "script.py") -> str:
    (folder / name).write_text(text)
    return name


@pytest.mark.parametrize(
    ("text", "args", "error"),
    [
        ("import not_a_module_of_anyone\n", [], "ModuleNotFoundError: No module named "
         "'not_a_module_of_anyone'"),
        ("import argparse\nargparse.ArgumentParser().parse_args()\n", ["--epochz", "3"],
         "exited with status 2: script.py: error: unrecognized arguments: --epochz 3"),
        ("from lightning.fabric import Fabric\nFabric().launch()\n", [],
         "RuntimeError: This script was launched through the CLI, and processes have already "
         "been created. Calling `.launch()` again is not allowed. (fix: under `fabric run`, "
         "leave out fabric.launch() (fabric run has started the processes already))"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_an_error_before_the_first_step_is_a_script_error(
    tmp_path: Path, text: str, args: list[str], error: str
) -> None:
    # LT_CLI_USED: what `fabric run` sets, and Lightning's launch() looks at.
    result = launch(tmp_path, script(tmp_path, text), *args, env={"LT_CLI_USED": "1"})
    assert result.returncode != 0
    assert record(tmp_path) == {
        "state": "failed", "trained": False, "error": error, "infrastructure": False,
    }  # fmt: skip
    assert outcome(tmp_path / "status", ranks=1).script_error == error
    assert "Traceback" in result.stderr or "error:" in result.stderr  # its own output, as ever


@pytest.mark.slow
def test_an_error_after_the_first_step_is_a_fault(tmp_path: Path) -> None:
    result = launch(tmp_path, script(tmp_path, ONE_STEP + "raise OSError('disk full')\n"))
    assert result.returncode == 1
    assert record(tmp_path)["trained"] is True
    ended = outcome(tmp_path / "status", ranks=1)
    assert (ended.finished, ended.script_error, ended.error) == (False, "", "OSError: disk full")


@pytest.mark.slow
def test_torch_distributed_errors_are_faults_even_before_a_step(tmp_path: Path) -> None:
    text = "import torch.distributed as d\nraise d.DistNetworkError('peer gone')\n"
    launch(tmp_path, script(tmp_path, text))
    assert record(tmp_path)["infrastructure"] is True
    assert outcome(tmp_path / "status", ranks=1).script_error == ""


DESTROYS_NOTHING = """\
import atexit, os, sys
import torch.distributed as dist
sys.path.insert(0, "unused")
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
dist.all_reduce(__import__("torch").ones(1))
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
print("argv", sys.argv[1:], "path0", sys.path[1], "name", __name__, flush=True)
"""


@pytest.mark.slow
def test_a_script_runs_as_python_runs_it_and_ends_with_its_group_destroyed(
    tmp_path: Path,
) -> None:
    result = launch(tmp_path, script(tmp_path, DESTROYS_NOTHING), "--precision", "x")
    assert result.returncode == 0, result.stderr
    assert f"argv ['--precision', 'x'] path0 {tmp_path} name __main__" in result.stdout
    assert "initialized at exit: False" in result.stdout  # the launcher destroyed it
    assert record(tmp_path)["state"] == "finished"
    assert outcome(tmp_path / "status", ranks=1).finished


@pytest.mark.slow
def test_a_module_runs_as_python_dash_m_runs_it(tmp_path: Path) -> None:
    package = tmp_path / "src" / "mypkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("NAME = 'net'\n")
    (package / "train.py").write_text(
        "import sys\nfrom mypkg.model import NAME\nprint(__name__, NAME, sys.argv[1:])\n"
    )
    result = launch(tmp_path, "-m", "mypkg.train", "--epochs", "2", cwd=tmp_path / "src")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "__main__ net ['--epochs', '2']"


def test_a_node_with_a_rank_that_never_ended_its_script_has_not_finished(tmp_path: Path) -> None:
    folder = tmp_path / "status"
    folder.mkdir()
    (folder / "rank-0.json").write_text(json.dumps({"state": "finished"}))
    (folder / "rank-1.json").write_text(json.dumps({"state": "training", "trained": True}))
    assert not outcome(folder, ranks=2).finished
    assert not outcome(folder, ranks=3).finished  # a rank that wrote nothing (killed at once)
    (folder / "rank-1.json").write_text(json.dumps({"state": "finished"}))
    assert outcome(folder, ranks=2).finished
    (folder / "rank-2.json").write_text("{torn")
    assert [status.rank for status in read_statuses(folder)] == [0, 1]


@pytest.fixture
def torchrun_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[TCPStore]:
    """torchrun's own store, as a rank sees it: at MASTER_ADDR:MASTER_PORT, 2 ranks."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                        "WORLD_SIZE": "2", "RANK": "3"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    yield store


def count_in(store: TCPStore, key: str = f"{FINISHED_KEY}/0") -> None:
    """The other rank's end, as its launcher counts itself in."""
    if store.add(key, 1) >= 2:
        store.set(f"{key}/all", "1")


@pytest.mark.slow
def test_a_rank_that_finished_leaves_only_once_every_rank_has(
    tmp_path: Path, torchrun_store: TCPStore
) -> None:
    """Rank 3 finished; its peer is still in its last lines: rank 3 stays (a rank that left
    first and aborted at exit would have torchrun kill the peer before it recorded its end)."""
    command = [sys.executable, str(LAUNCH_SCRIPT), "--", script(tmp_path, ONE_STEP)]
    environment = {**os.environ, "FABRIC_LAUNCH_STATUS_DIR": str(tmp_path / "status")}
    with subprocess.Popen(command, cwd=tmp_path, env=environment, text=True) as rank:
        deadline = time.monotonic() + 60
        while (
            not (tmp_path / "status" / "rank-3.json").exists()
            or record(tmp_path)["state"] != "finished"
        ):
            assert rank.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(2)
        assert rank.poll() is None  # finished, and waiting for its peer
        count_in(torchrun_store)
        assert rank.wait(timeout=30) == 0


def test_a_rank_whose_peers_never_finish_leaves_after_the_wait(
    torchrun_store: TCPStore, capfd: pytest.CaptureFixture[str]
) -> None:
    wait_for_peers(timedelta(seconds=1))
    assert "rank 3 finished; not every rank did within 1 s, leaving without them" in (
        capfd.readouterr().err
    )


def test_the_last_rank_to_finish_opens_the_gate_at_once(
    torchrun_store: TCPStore, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    count_in(torchrun_store, f"{FINISHED_KEY}/2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # torchrun's third try: its own count
    started = time.monotonic()
    wait_for_peers(timedelta(seconds=20))
    assert time.monotonic() - started < 5
    assert torchrun_store.get(f"{FINISHED_KEY}/2/all") == b"1"
    assert "leaving without them" not in capfd.readouterr().err
