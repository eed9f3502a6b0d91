"""`make gpu-check` (gpu/check.py) run here on CPU: its cases pass, and a bad payload fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stacks.config import PROJECT_DIR

pytestmark = pytest.mark.slow  # each case trains: the payload, fabric run, the local cluster

CASES = (
    "payload alone",
    "fabric run ddp",
    "local cluster",
    "resume",
    "FSDP sharded save (2 rank(s))",
    "FSDP sharded load",
)


def gpu_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A GPU machine's python has torch, lightning, click, tqdm and matplotlib, but none of
    # these: packages that cannot be imported stand in for that.
    no_boto3 = tmp_path / "no-boto3"
    for package in ("boto3", "botocore", "pathspec", "uv", "aws_cdk", "cdk_nag"):
        (no_boto3 / package).mkdir(parents=True)
        (no_boto3 / package / "__init__.py").write_text(f'raise ImportError("no {package}")\n')
    return subprocess.run(
        [sys.executable, "-m", "gpu.check", "--accelerator", "cpu", "--samples", "1024", *args],
        cwd=PROJECT_DIR,
        env={**os.environ, "PYTHONPATH": str(no_boto3)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_case_passes_on_cpu_without_boto3(tmp_path: Path) -> None:
    result = gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for case in CASES:
        assert any(line.startswith(f"PASS  {case} (") for line in lines), result.stdout
    assert "gpu-check: 6 of 6 passed" in lines


# Exits 0 and writes a summary, but its loss rose and it never resumes.
RISING_LOSS = """\
import json, os, pathlib, sys
args = sys.argv[1:]
run_dir = pathlib.Path(
    args[args.index("--run-dir") + 1] if "--run-dir" in args else os.environ["FABRIC_RUN_DIR"]
)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "summary.json").write_text(json.dumps({"first_loss": 1.0, "final_loss": 2.0}))
print("the bogus payload ran")
"""


def test_a_payload_whose_loss_rises_fails_every_case(tmp_path: Path) -> None:
    script = tmp_path / "rising.py"
    script.write_text(RISING_LOSS)
    result = gpu_check(tmp_path, "--script", str(script), "--sharded-script", str(script))
    assert result.returncode == 1, result.stdout[-4000:]
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("PASS")]
    rose = "the loss did not fall: first 1.0, final 2.0"
    for case in (*CASES[:3], CASES[4]):
        assert any(line.startswith(f"FAIL  {case} (") and rose in line for line in lines), lines
    assert any(line.startswith("FAIL  resume (") and "no 'resumed from'" in line for line in lines)
    no_resume = "no 'rank 0: resumed from step 20'"
    assert any(line.startswith(f"FAIL  {CASES[5]} (") and no_resume in line for line in lines)
    assert "      | the bogus payload ran" in lines  # the tail of a failed case's output
    assert "gpu-check: 0 of 6 passed" in lines


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        ({"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"}, ""),
        ({"__0_0.distcp", ".metadata", "meta.pt"}, "not a whole sharded checkpoint of 2"),
        ({"__0_0.distcp", "__1_0.distcp", "meta.pt"}, "not a whole sharded checkpoint of 2"),
        (None, "no sharded checkpoint"),  # a single file, not a folder of shards
    ],
)
def test_a_sharded_checkpoint_is_whole_only_with_every_ranks_shard(
    names: set[str] | None, problem: str, tmp_path: Path
) -> None:
    from gpu.check import shards_problem

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    if names is None:
        (checkpoints / "step-00000020.ckpt").write_bytes(b"one file")
    else:
        (checkpoints / "step-00000010.ckpt").mkdir()  # older, whole or not: the newest counts
        (checkpoints / "step-00000020.ckpt").mkdir()
        for name in names:
            (checkpoints / "step-00000020.ckpt" / name).write_bytes(b"")
    found = shards_problem(checkpoints, 2)
    assert (problem in found) if problem else found == "", found
