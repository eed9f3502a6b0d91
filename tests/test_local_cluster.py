"""The local cluster: real 2-node x 2-device training on 127.0.0.1, failures, resume, cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from local.cluster import default_precision
from local.process_groups import STOP_GRACE_SECONDS
from stacks.config import PROJECT_DIR
from userdata.fabric_command import LAUNCH_SCRIPT

SMALL = ["--samples", "2048", "--batch-size", "32"]  # 16 steps per epoch at world size 4
# 2 nodes x 1 device, 16 steps per epoch: 4 processes start instead of 6 (most of a short
# run's time on 2 cores is each process importing lightning).
TWO_BY_ONE = ["--devices-per-node", "1"]
SMALL_2 = ["--samples", "1024", "--batch-size", "32"]
CKPT = "step-*.ckpt"


def cluster(run_dir: Path, *args: str, script_args: list[str] | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "local.cluster",
        "--run-dir",
        str(run_dir),
        *args,
        "--",
        *(script_args or []),
    ]


def processes_of(run_dir: Path) -> list[int]:
    """Live processes whose environment names this run dir (every node and worker has it)."""
    marker = f"FABRIC_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def run(
    run_dir: Path, *args: str, script_args: list[str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cluster(run_dir, *args, script_args=script_args),
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert processes_of(run_dir) == []
    return result


@pytest.mark.slow
def test_two_nodes_by_two_devices_train_and_the_loss_falls(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(run_dir, script_args=["--epochs", "3", *SMALL])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "[cluster] starting node 1" in out.split("[cluster] starting node 0")[0]  # last first
    assert "[node 0] training: world size 4 (2 device(s) x 2 node(s))" in out
    assert "[node 1] epoch 3/3" in out and "[node 0] epoch 3/3" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"], summary["devices_per_node"]) == (4, 2, 2)
    assert summary["steps"] == 3 * 16
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    for key in ("checkpoint", "metrics", "plot"):
        assert Path(summary[key]).is_file() and f"[cluster] {key}:" in out
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_failing_node_stops_the_cluster(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run(
        run_dir,
        "--devices-per-node",
        "1",
        "--max-restarts",
        "0",
        "--script",
        "tests/payloads/node_fails.py",
    )
    assert result.returncode == 1
    assert "[cluster] error: node 1 exited with status" in result.stderr
    assert "gave up" not in result.stderr
    assert time.monotonic() - started < 90


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(path.stem.removeprefix("step-")) for path in (run_dir / "checkpoints").glob(CKPT)]


def wait_for_a_checkpoint_after(
    process: subprocess.Popen[str] | subprocess.Popen[bytes], run_dir: Path, step: int
) -> None:
    """Waits for a checkpoint of a step after `step`; fails if the run ends first."""
    deadline = time.monotonic() + 180
    while max(checkpoint_steps(run_dir), default=-1) <= step:
        assert process.poll() is None, f"the run ended before a checkpoint after step {step}"
        assert time.monotonic() < deadline, f"no checkpoint after step {step} within 180 s"
        time.sleep(0.05)
    # What comes next must reach a run that is still training: its work is sized for that.
    assert process.poll() is None and not (run_dir / "summary.json").exists()


def final_weights(summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    return torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_after_ctrl_c_ends_with_the_same_steps(tmp_path: Path) -> None:
    base = [*SMALL_2, "--checkpoint-every", "5"]  # checkpoints within epochs too
    run_dir = tmp_path / "run"
    # 40 epochs: seconds of training after the first epoch, so the Ctrl-C always finds it running.
    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        process = subprocess.Popen(
            cluster(run_dir, *TWO_BY_ONE, script_args=[*base, "--epochs", "40"]),
            cwd=PROJECT_DIR,
            stdout=out,
            stderr=err,
        )
    try:
        # After the first epoch: a resume there would go wrong if the sampler took Fabric's
        # count of passes over the loader (0 again after a restart) for the epoch.
        wait_for_a_checkpoint_after(process, run_dir, 16)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert processes_of(run_dir) == []
    assert not (run_dir / "summary.json").exists()
    checkpoints = run_dir / "checkpoints"
    newest = sorted(checkpoints.glob(CKPT))[-1]
    step = int(newest.stem.removeprefix("step-"))
    # Ctrl-C: one line that says where the run is and how to go on; no torch tracebacks.
    said = (tmp_path / "out").read_text() + (tmp_path / "err").read_text()
    assert "Traceback" not in said and "SignalException" not in said
    assert (tmp_path / "err").read_text().splitlines()[-1] == (
        f'[cluster] interrupted at step {step}; continue with make local ARGS="--run-dir {run_dir}"'
    )
    # A torn newest checkpoint (as if the machine died while writing it) must not be used.
    torn = checkpoints / "step-99999999.ckpt"
    torn.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    # The resumed run ends one epoch after the interrupted one's, at most 32 steps on. A
    # restart's first step sums gradients in another order (DDP regroups its buckets after it):
    # at world size 4 that is float noise, 1e-7, and Adam grows such noise to 1e-2 in 300
    # steps. With no learning-rate schedule, --epochs only says where a run ends.
    epochs = step // 16 + 2
    total = epochs * 16
    resumed = run(run_dir, *TWO_BY_ONE, script_args=[*base, "--epochs", str(epochs)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout  # the nodes' stdout and stderr
    assert f"skipping unreadable checkpoint {torn}" in out
    assert "set aside as step-99999999.ckpt.unreadable" in out
    assert not torn.exists() and torn.with_name(torn.name + ".unreadable").exists()
    assert f"resumed from {newest} at step {step}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (total, total - step)
    # The checkpoint the run saved last, which loads: not the torn file, the "newest" one.
    assert summary["checkpoint"] == str(checkpoints / f"step-{total:08d}.ckpt")

    reference = run(
        tmp_path / "reference", *TWO_BY_ONE, script_args=[*base, "--epochs", str(epochs)]
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert expected["steps"] == total
    weights, reference_weights = final_weights(summary), final_weights(expected)
    # Equal bit for bit here (a sum of two gradients is the same in either order); the
    # tolerance is only for float noise. A resume that loses the optimizer's state or reshuffles
    # an epoch differs by 1e-1.
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        difference = (weights[name] - tensor).abs().max().item()
        assert difference < 1e-5, f"{name}: weights differ by {difference} after the resume"
    assert summary["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-5, abs=0)


def test_bad_arguments_are_refused_before_anything_starts(tmp_path: Path) -> None:
    result = run(tmp_path / "run", "--script", "nope.py")
    assert result.returncode == 2
    assert "--script nope.py: no such file" in result.stderr


def test_more_gpu_ranks_than_gpus_are_refused_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(run_dir, "--accelerator", "gpu", "--num-nodes", "4", "--devices-per-node", "16")
    assert result.returncode == 1
    gpus = torch.cuda.device_count()
    assert result.stderr.splitlines() == [
        f"[cluster] error: 4 node(s) x 16 device(s) need 64 GPUs, torch sees {gpus}: "
        "one GPU cannot host two NCCL ranks"
    ]
    assert "starting node" not in result.stdout and not run_dir.exists()


SHOW_PRECISION = """\
import os
print("precision", os.environ["LT_PRECISION"])
"""


@pytest.mark.parametrize(
    ("args", "expected"), [((), "32-true"), (("--precision", "bf16-mixed"), "bf16-mixed")]
)
@pytest.mark.slow
def test_precision_reaches_the_script(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    script = tmp_path / "show.py"
    script.write_text(SHOW_PRECISION)
    one_node = ["--num-nodes", "1", "--devices-per-node", "1", "--script", str(script)]
    result = run(tmp_path / "run", *one_node, *args, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"--precision={expected} {LAUNCH_SCRIPT} -- {script}" in result.stdout
    assert f"[node 0] precision {expected}" in result.stdout


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_precision_is_bf16_where_the_gpu_has_it(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_args, **_kw: bf16)
    assert default_precision("gpu") == default_precision("cuda") == expected
    assert default_precision("cpu") == "32-true"


@pytest.mark.parametrize("nodes", [4])
@pytest.mark.slow
def test_four_nodes_by_one_device(tmp_path: Path, nodes: int) -> None:
    run_dir = tmp_path / "run"
    result = run(
        run_dir,
        "--num-nodes",
        str(nodes),
        "--devices-per-node",
        "1",
        script_args=["--epochs", "1", *SMALL],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"]) == (4, 4)


@pytest.mark.slow
def test_past_max_restarts_it_fails_clearly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(
        run_dir,
        "--devices-per-node",
        "1",
        "--max-restarts",
        "1",
        "--script",
        "tests/payloads/node_fails.py",
    )
    assert result.returncode == 1
    assert "restart 1 of 1 (the run resumes from its newest checkpoint)" in result.stdout
    assert result.stderr.strip().endswith("stopped the other nodes; gave up after 1 restart(s)")


@pytest.mark.slow
def test_late_main_node(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(
        run_dir,
        "--devices-per-node",
        "1",
        "--main-node-delay",
        "12",
        script_args=["--epochs", "1", *SMALL],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[cluster] node 0 starts in 12 s" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


def worker_pids(run_dir: Path, global_rank: int) -> list[int]:
    marker = f"FABRIC_RUN_DIR={run_dir}".encode()
    found = []
    for pid in processes_of(run_dir):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            marker in environ
            and f"RANK={global_rank}".encode() in environ
            and b"train.py" in cmdline
        ):
            found.append(pid)
    return found


def node_pids(run_dir: Path, node_rank: int) -> list[int]:
    """The `fabric run` process of a node (its workers are its children)."""
    rank = f"--node-rank={node_rank}".encode()
    found = []
    for pid in processes_of(run_dir):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if rank in command and b"lightning.fabric.cli" in command:
                found.append(pid)
    return found


@pytest.mark.slow
def test_a_frozen_worker_fails_the_survivors_within_the_pg_timeout_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    """Node 1's worker stops answering (SIGSTOP: a hung process, a node gone off the network).

    Node 1 itself goes on running, so nothing here tells node 0: as on EC2, where each node's
    agent sees only its own node, node 0 fails only because the payload's --pg-timeout bounds
    its collectives. Then the cluster restarts every node and the run resumes.
    """
    pg_timeout = 10
    slack = 15  # a process with torch ending after an exception, torchrun seeing it: 2-3 s
    run_dir = tmp_path / "run"
    # 10 epochs: seconds of training after the first checkpoint, so the freeze finds it training.
    args = ["--epochs", "10", *SMALL_2, "--checkpoint-every", "5", "--pg-timeout", str(pg_timeout)]
    process = subprocess.Popen(
        cluster(run_dir, *TWO_BY_ONE, "--max-restarts", "1", script_args=args),
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: [lines.append((time.monotonic(), line)) for line in process.stdout],
        daemon=True,
    )
    reader.start()
    try:
        wait_for_a_checkpoint_after(process, run_dir, 0)  # training has started
        nodes_0, victims = node_pids(run_dir, 0), worker_pids(run_dir, global_rank=1)
        assert len(nodes_0) == len(victims) == 1, (nodes_0, victims)
        node_0 = nodes_0[0]
        os.kill(victims[0], signal.SIGSTOP)  # node 1's worker
        frozen_at = time.monotonic()
        while node_0 in processes_of(run_dir):  # until node 0 (its `fabric run`) has exited
            took = time.monotonic() - frozen_at
            assert took < pg_timeout + slack, (
                f"node 0 still running {took:.0f} s after the freeze, --pg-timeout {pg_timeout}"
            )
            time.sleep(0.1)
        failed_after = time.monotonic() - frozen_at
        # Not before the timeout either: it is the timeout, not something else, that ended it.
        assert failed_after > pg_timeout - 1, f"node 0 ended {failed_after:.1f} s after the freeze"
        # Then the cluster stops node 1, whose frozen worker ignores SIGTERM (the whole grace),
        # says why and starts every node again.
        deadline = time.monotonic() + STOP_GRACE_SECONDS + slack
        while not any("[cluster] node " in line for _, line in lines):
            assert time.monotonic() < deadline, "the cluster did not say which node failed"
            time.sleep(0.1)
        line = next(line for _, line in lines if "[cluster] node " in line)
        print(f"node 0 ended {failed_after:.1f} s after the freeze", line, sep="\n")
        assert line.startswith("[cluster] node 0 exited with status"), line
        assert "restart 1 of 1" in line
        assert process.wait(timeout=240) == 0
        reader.join(timeout=10)
        out = "".join(line for _, line in lines)
        assert "resumed from" in out, out[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 10 * 16  # the same total as an uninterrupted run
        assert 0 < summary["steps_this_run"] < summary["steps"]
        assert processes_of(run_dir) == []  # the frozen worker too
    finally:
        # Nothing this test started may outlive it, frozen or not, whatever failed above.
        if process.poll() is None:
            process.terminate()  # the cluster stops its nodes
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in processes_of(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reader.join(timeout=10)


def runs_command(runs: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "local.cluster", "--runs", str(runs), "--num-nodes", "1",
        "--devices-per-node", "1", *args, "--", "--epochs", "1", "--samples", "512",
    ]  # fmt: skip


@pytest.mark.slow
def test_every_make_local_is_a_new_run_and_a_complete_run_is_not_trained_again(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    trained = []
    for _ in range(2):
        result = subprocess.run(
            runs_command(runs), cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        run_dir = Path((runs / "latest").resolve())
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps_this_run"] == summary["steps"] > 0 and summary["samples_per_s"] > 0
        assert json.loads((run_dir / "fabric-run.json").read_text())["status"] == "complete"
        trained.append(run_dir.name)
        time.sleep(1.1)  # run names are to the second
    assert len(set(trained)) == 2 and (runs / "latest").resolve().name == trained[1]
    again = subprocess.run(
        runs_command(runs, "--run", trained[0]),
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0
    assert f"[cluster] run {trained[0]} is complete already" in again.stdout
    assert "starting node" not in again.stdout
    assert (runs / "latest").resolve().name == trained[1]  # untouched
    # More epochs: the complete run trains on (as a deployed one does), then remembers them.
    more = [*runs_command(runs, "--run", trained[0])[:-4], "--epochs", "2", "--samples", "512"]
    on = subprocess.run(more, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert on.returncode == 0, on.stdout[-2000:] + on.stderr[-2000:]
    assert "trains on with '--epochs 2 --samples 512'" in on.stdout
    summary = json.loads((runs / trained[0] / "summary.json").read_text())
    assert summary["steps"] == 2 * summary["steps_this_run"]
    bare = runs_command(runs, "--run", trained[0])[:-5]  # no script arguments at all
    last = subprocess.run(bare, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert f"[cluster] run {trained[0]} is complete already" in last.stdout, last.stdout


@pytest.mark.slow
def test_a_script_error_stops_the_cluster_at_once_and_is_its_last_line(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import not_a_module_of_anyone\n")
    started = time.monotonic()
    result = run(tmp_path / "run", *TWO_BY_ONE, "--script", str(script), timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "[cluster] error: node 0: script: ModuleNotFoundError: No module named "
        "'not_a_module_of_anyone'"
    )
    assert "restart 1 of 3" not in result.stdout  # the same code fails the same way
    assert result.stdout.count("[cluster] starting node 0") == 1
    assert time.monotonic() - started < 60


NO_TEARDOWN = """\
import atexit, os, sys, pathlib
import torch
from lightning.fabric import Fabric

fabric = Fabric()
weight = torch.nn.Parameter(torch.ones(1, device=fabric.device))
optimizer = torch.optim.SGD([weight], lr=0.1)
for _ in range(3):
    optimizer.zero_grad()
    fabric.backward((weight * fabric.all_reduce(torch.ones(1, device=fabric.device))).sum())
    optimizer.step()
runs = pathlib.Path(os.environ["FABRIC_RUN_DIR"], "starts")
runs.mkdir(parents=True, exist_ok=True)
(runs / f"{os.environ['RANK']}-{os.getpid()}").write_text("trained")
fabric.barrier()
if sys.argv[1:] == ["--abort-at-exit"]:
    atexit.register(os.abort)  # what a gloo thread torn down at exit does, now and then
# No destroy_process_group(): most scripts end so (Lightning's guide too).
"""


@pytest.mark.slow
def test_a_finished_script_is_never_restarted_whatever_its_exit(tmp_path: Path) -> None:
    """A script that does not tear down its process group, run again and again; and one that
    aborts at exit after every rank finished (as a gloo thread does, now and then): done,
    never restarted (a restart would train nothing and overwrite the run's summary)."""
    script = tmp_path / "no_teardown.py"
    script.write_text(NO_TEARDOWN)
    for attempt in range(3):
        run_dir = tmp_path / f"run-{attempt}"
        result = run(run_dir, *TWO_BY_ONE, "--script", str(script), timeout=120)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "terminate called" not in result.stdout + result.stderr
        assert len(list((run_dir / "starts").iterdir())) == 2  # one start of each rank
    run_dir = tmp_path / "aborts"
    result = run(run_dir, *TWO_BY_ONE, "--script", str(script), script_args=["--abort-at-exit"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "after every rank finished its script: done" in result.stdout
    assert "restart 1 of" not in result.stdout
    assert len(list((run_dir / "starts").iterdir())) == 2


SHIPS_AND_WRITES = """\
import os, pathlib
print("config:", pathlib.Path("config.yaml").read_text().strip())
print("secret here:", pathlib.Path("secret.yaml").exists())
pathlib.Path("lightning_logs/version_0").mkdir(parents=True, exist_ok=True)
pathlib.Path("lightning_logs/version_0/rank%s.txt" % os.environ["RANK"]).write_text("x")
"""


@pytest.mark.slow
def test_the_local_cluster_runs_what_ships_and_keeps_what_the_script_writes(
    tmp_path: Path,
) -> None:
    """The default project, staged as the payload asset holds it: a .gitignore'd file that the
    script would need is not there (as on every node), what it writes beside itself is kept
    in the run folder, and the user's folder is left as it was."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(SHIPS_AND_WRITES)
    (project / "config.yaml").write_text("shipped\n")
    (project / "secret.yaml").write_text("never ships\n")
    (project / ".gitignore").write_text("secret.yaml\n")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", "import sys, local.cluster as c; c.DEFAULT_PROJECT = "
         f"__import__('pathlib').Path({str(project)!r}); sys.exit(c.main(sys.argv[1:]))",
         "--run-dir", str(run_dir), *TWO_BY_ONE],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[node 0] config: shipped" in result.stdout
    assert "[node 0] secret here: False" in result.stdout  # as on a node
    assert "3 shipped file(s) staged" in result.stdout  # train.py, config.yaml, .gitignore
    outputs = run_dir / "outputs"
    assert sorted(p.relative_to(outputs).as_posix() for p in outputs.rglob("*.txt")) == [
        "lightning_logs/version_0/rank0.txt",
        "lightning_logs/version_0/rank1.txt",
    ]
    assert not (project / "lightning_logs").exists()


SHOW_ENV = """\
import os, pathlib
data = pathlib.Path(os.environ["FABRIC_DATA_DIR"])
print("env", os.environ["WANDB_PROJECT"], os.environ["HF_TOKEN"], os.environ["QUOTED"],
      sorted(p.name for p in data.iterdir()))
"""


@pytest.mark.slow
def test_env_an_env_file_and_a_data_folder_reach_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text(SHOW_ENV)
    (tmp_path / ".env").write_text(
        "# keys\nexport HF_TOKEN=hf_from_file\nWANDB_PROJECT=from-file\nQUOTED='a b, c'\n"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.bin").write_bytes(b"x")
    result = run(
        tmp_path / "run",
        "--num-nodes", "2", "--devices-per-node", "1", "--script", str(script),
        "--env-file", str(tmp_path / ".env"), "--env", "WANDB_PROJECT=demo",
        "--data", str(tmp_path / "data"),
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):  # --env wins over the file
        assert f"[node {rank}] env demo hf_from_file a b, c ['train.bin']" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--env", "NOVALUE"), "--env 'NOVALUE': expected KEY=VALUE"),
        (("--env", "RANK=3"), "--env 'RANK=3': RANK is set by the node agent or fabric run"),
        (("--env-file", "absent.env"), "--env-file absent.env: no such file"),
        (("--data", "no-such-folder"), "--data no-such-folder: no such folder"),
    ],
)
def test_bad_env_options_are_one_line_before_anything_starts(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = run(tmp_path / "run", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert "starting node" not in result.stdout
