"""The local cluster: real 2-node x 2-device training on 127.0.0.1, failures, resume, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from local.cluster import default_precision
from stacks.config import PROJECT_DIR

SMALL = ["--samples", "2048", "--batch-size", "32"]  # 16 steps per epoch at world size 4


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


def test_resume_after_ctrl_c_ends_with_the_same_steps(tmp_path: Path) -> None:
    args = ["--epochs", "3", *SMALL, "--checkpoint-every", "4"]
    reference = run(tmp_path / "reference", script_args=args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "reference" / "summary.json").read_text())

    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        cluster(run_dir, script_args=args),
        cwd=PROJECT_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    assert process.wait(timeout=60) == 130
    assert processes_of(run_dir) == []
    assert not (run_dir / "summary.json").exists()
    newest = sorted(checkpoints.glob("step-*.ckpt"))[-1]
    # A torn newest checkpoint (as if the machine died while writing it) must not be used.
    torn = checkpoints / "step-99999999.ckpt"
    torn.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    resumed = run(run_dir, script_args=args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping unreadable checkpoint {torn}" in resumed.stdout  # nodes: stdout+stderr
    assert "resumed from" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == expected["steps"] == 3 * 16
    assert summary["steps_this_run"] < summary["steps"]
    # Not bit-identical: DDP regroups its gradient buckets after a (re)start's first step, which
    # changes gloo's summation order; the training itself is the same.
    assert abs(summary["final_loss"] - expected["final_loss"]) < 0.05 * expected["final_loss"]


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
def test_precision_reaches_the_script(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    script = tmp_path / "show.py"
    script.write_text(SHOW_PRECISION)
    one_node = ["--num-nodes", "1", "--devices-per-node", "1", "--script", str(script)]
    result = run(tmp_path / "run", *one_node, *args, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"--precision={expected} {script}" in result.stdout
    assert f"[node 0] precision {expected}" in result.stdout


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_precision_is_bf16_where_the_gpu_has_it(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_args, **_kw: bf16)
    assert default_precision("gpu") == default_precision("cuda") == expected
    assert default_precision("cpu") == "32-true"


@pytest.mark.parametrize("nodes", [4])
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


def test_late_main_node(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run(
        run_dir,
        "--devices-per-node",
        "1",
        "--main-node-delay",
        "20",
        script_args=["--epochs", "1", *SMALL],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[cluster] node 0 starts in 20 s" in result.stdout
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


def test_a_killed_worker_restarts_the_cluster_which_resumes(tmp_path: Path) -> None:
    pg_timeout = 30
    run_dir = tmp_path / "run"
    args = ["--epochs", "3", *SMALL, "--checkpoint-every", "4", "--pg-timeout", str(pg_timeout)]
    process = subprocess.Popen(
        cluster(run_dir, script_args=args),
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: [lines.append((time.monotonic(), line)) for line in process.stdout],
        daemon=True,
    )
    reader.start()
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step-*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = worker_pids(run_dir, global_rank=2)  # a worker of node 1
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()
    assert process.wait(timeout=300) == 0
    reader.join(timeout=10)
    out = "".join(line for _, line in lines)
    noticed = [at for at, line in lines if "restart 1 of 3" in line]
    assert noticed and noticed[0] - killed_at < pg_timeout, out[-3000:]
    assert "resumed from" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 * 16  # the same total as an uninterrupted run
    assert summary["steps_this_run"] < summary["steps"]
    assert processes_of(run_dir) == []
