"""`make gpu-check`: the payload's GPU paths, which no CPU test can reach, in about a minute.

    python3 -m gpu.check [--accelerator cuda|cpu] [--script trainer/train.py]
                         [--sharded-script examples/guide_resume/train.py]

Six short trainings, each its own process of this very python (a GPU machine brings its own
python3 with a CUDA torch: no project venv, no boto3, no network needed):
  a. the payload alone, `python trainer/train.py`;
  b. `fabric run --strategy=ddp --devices=1`: a real process group (NCCL on a GPU);
  c. the local cluster, 1 node x 1 device (its default GPU precision, bf16-mixed or 16-mixed);
  d. (a)'s run again with more epochs: it must resume from (a)'s checkpoint;
  e. examples/guide_resume --sharded under `fabric run` (up to 2 GPUs): FSDP2 through Fabric's
     ModelParallelStrategy, every rank saving its own shard (torch.distributed.checkpoint);
  f. (e)'s run again with more steps: every rank loads the sharded checkpoint and goes on.
Each must exit 0 and write a summary.json whose loss fell (on cuda: trained on a GPU). Prints
PASS or FAIL per case with its seconds (and the tail of its output on failure); exits 1 if any
failed. `--accelerator cpu` runs the same cases on CPU (gloo), which is how the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from local.process_groups import stop_groups

ROOT = Path(__file__).resolve().parent.parent
GUIDE_EXAMPLE = ROOT / "examples" / "guide_resume" / "train.py"
TAIL_LINES = 40


@dataclass
class Case:
    name: str
    command: list[str]
    run_dir: Path
    env: dict[str, str]
    expect: str = ""  # a line of the output must contain this
    shards: int = 0  # the newest checkpoint is a folder with a shard of this many ranks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m gpu.check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--script", default=str(ROOT / "trainer" / "train.py"))
    parser.add_argument(
        "--sharded-script", default=str(GUIDE_EXAMPLE), help="the FSDP cases' script (e, f)"
    )
    parser.add_argument("--samples", type=int, default=4096, help="synthetic samples per run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    args = parser.parse_args(argv)
    args.script = str(Path(args.script).resolve())
    args.sharded_script = str(Path(args.sharded_script).resolve())
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sharded_devices(accelerator: str) -> int:
    """Two ranks where there are two devices: a shard each (one GPU still runs FSDP2 and
    torch.distributed.checkpoint on NCCL)."""
    if accelerator == "cpu":
        return 2
    import torch

    return max(1, min(2, torch.cuda.device_count()))


def cases(args: argparse.Namespace, work: Path) -> list[Case]:
    python, script, accelerator = sys.executable, args.script, args.accelerator
    short = ["--samples", str(args.samples), "--epochs"]  # followed by the number of epochs
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The payload alone picks its device itself: pinned here, so that a torch without CUDA
    # fails the check instead of quietly training on the CPU.
    alone_env = {**env, "LT_ACCELERATOR": accelerator, "LT_DEVICES": "1"}
    alone, ddp, cluster, sharded = (work / name for name in ("alone", "ddp", "cluster", "sharded"))
    # The CLI as a module: this python's lightning, whether or not a `fabric` is on PATH.
    fabric_run = [python, "-m", "lightning.fabric.cli", "--strategy=ddp", "--devices=1"]
    fabric_run += [f"--accelerator={accelerator}", f"--main-port={free_port()}"]
    local_cluster = [python, "-m", "local.cluster", "--num-nodes", "1", "--devices-per-node", "1"]
    local_cluster += ["--accelerator", "gpu" if accelerator == "cuda" else "cpu"]
    local_cluster += ["--max-restarts", "0", "--script", script, "--run-dir", str(cluster), "--"]
    devices = sharded_devices(accelerator)
    fsdp = [python, "-m", "lightning.fabric.cli", f"--devices={devices}"]
    fsdp += [f"--accelerator={accelerator}", f"--main-port={free_port()}", args.sharded_script]
    fsdp_env = {**env, "FABRIC_RUN_DIR": str(sharded)}
    return [
        Case(
            "payload alone",
            [python, script, *short, "2", "--run-dir", str(alone)],
            alone,
            alone_env,
        ),
        Case("fabric run ddp", [*fabric_run, script, *short, "2", "--run-dir", str(ddp)], ddp, env),
        Case("local cluster", [*local_cluster, *short, "2"], cluster, env),
        Case(
            "resume",
            [python, script, *short, "4", "--run-dir", str(alone)],
            alone,
            alone_env,
            expect="resumed from",
        ),
        Case(
            f"FSDP sharded save ({devices} rank(s))",
            [*fsdp, "--sharded", "--max-steps", "20"],
            sharded,
            fsdp_env,
            shards=devices,
        ),
        Case(
            "FSDP sharded load",
            [*fsdp, "--sharded", "--max-steps", "30"],
            sharded,
            fsdp_env,
            expect="rank 0: resumed from step 20",
            shards=devices,
        ),
    ]


def verdict(case: Case, status: int, output: str, accelerator: str) -> str:
    """What is wrong with a finished case ("" when nothing is)."""
    if status != 0:
        return f"exited with status {status}"
    if case.expect and case.expect not in output:
        return f"no {case.expect!r} in its output"
    try:
        summary = json.loads((case.run_dir / "summary.json").read_text())
    except (OSError, ValueError) as error:
        return f"no readable summary.json: {error}"
    first, final = summary.get("first_loss"), summary.get("final_loss")
    if first is None or final is None or not final < first:
        return f"the loss did not fall: first {first}, final {final}"
    if accelerator == "cuda" and not str(summary.get("device", "")).startswith("cuda"):
        return f"trained on {summary.get('device')!r}, not on a GPU"
    if case.shards:
        return shards_problem(case.run_dir / "checkpoints", case.shards)
    return ""


def shards_problem(checkpoints: Path, ranks: int) -> str:
    """What is wrong with the newest sharded checkpoint ("" when nothing is): a folder with
    the shard files of every rank, the .metadata that names them and Lightning's meta.pt."""
    folders = sorted(path for path in checkpoints.glob("step-*.ckpt") if path.is_dir())
    if not folders:
        return f"no sharded checkpoint (a folder) in {checkpoints}"
    names = {path.name for path in folders[-1].iterdir()}
    written = {name.split("_")[2] for name in names if name.endswith(".distcp")}
    if written != {str(rank) for rank in range(ranks)} or not {".metadata", "meta.pt"} <= names:
        return f"{folders[-1].name} is not a whole sharded checkpoint of {ranks} rank(s): {names}"
    return ""


def run_case(case: Case, accelerator: str, timeout: float) -> bool:
    (case.run_dir / "summary.json").unlink(missing_ok=True)  # only this run's summary counts
    started = time.perf_counter()
    process = subprocess.Popen(
        case.command,
        cwd=ROOT,
        env=case.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so that a hung case is stopped with all it started
    )
    try:
        output = process.communicate(timeout=timeout)[0].decode(errors="replace")
        problem = verdict(case, process.returncode, output, accelerator)
    except subprocess.TimeoutExpired:
        stop_groups([process])  # SIGTERM first: the local cluster then stops its nodes
        output = process.communicate()[0].decode(errors="replace")
        problem = f"still running after {timeout:g} s"
    seconds = time.perf_counter() - started
    if not problem:
        print(f"PASS  {case.name} ({seconds:.1f} s)", flush=True)
        return True
    print(f"FAIL  {case.name} ({seconds:.1f} s): {problem}", flush=True)
    print(f"      command: {' '.join(case.command)}")
    for line in output.splitlines()[-TAIL_LINES:]:
        print(f"      | {line}")
    sys.stdout.flush()
    return False


def cuda_problem() -> str:
    """Why this python cannot train on a GPU ("" if it can), said once instead of four times."""
    try:
        import torch
    except ImportError as error:
        return f"no torch ({error})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no usable CUDA GPU"
    print(f"gpu-check: torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.accelerator == "cuda":
        problem = cuda_problem()
        if problem:
            print(f"FAIL  {sys.executable}: {problem}; run this on a GPU machine, or set ", end="")
            print("GPU_PYTHON to a python with a CUDA torch, lightning and click", flush=True)
            return 1
    print(f"gpu-check: {sys.executable}, accelerator {args.accelerator}, script {args.script}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        results = [
            run_case(case, args.accelerator, args.timeout) for case in cases(args, Path(work))
        ]
    failed = results.count(False)
    print(f"gpu-check: {len(results) - failed} of {len(results)} passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
