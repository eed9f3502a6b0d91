"""Benchmarks: where the time goes, from deploy to trained model.

    python -m bench.run [--runs 3] [--skip-tests] [--skip-install] [--skip-rehearsal]
                        [--skip-spot-upload]

(--skip-rehearsal skips the recovery section too: bench/recovery.py, `python -m bench.recovery`
on its own.)

Every figure is the median of --runs runs; every comparison is a ratio of two figures measured
in this same command. Prints a table and writes it to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bench import data_copy, recovery, spot_upload
from stacks.config import PROJECT_DIR
from stacks.user_data import UV_VERSION

RESULTS = PROJECT_DIR / "bench" / "results.md"
STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)(Z|\+00:00)?")
SMALL = ["--epochs", "2", "--samples", "4096"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def repeat(runs: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The median of each figure over `runs` runs."""
    samples = [measure() for _ in range(runs)]
    return {key: median([sample[key] for sample in samples]) for key in samples[0]}


def stamp_of(line: str) -> float | None:
    match = STAMP.search(line)
    if not match:
        return None
    return datetime.fromisoformat(match.group(1) + "+00:00").timestamp()


def timed_lines(command: list[str], env: dict[str, str] | None = None) -> list[tuple[float, str]]:
    """Runs a command; each output line with the wall-clock time it arrived."""
    process = subprocess.Popen(
        command,
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = [(time.time(), line) for line in process.stdout]
    if process.wait() != 0:
        tail = "".join(line for _, line in lines[-20:])
        raise RuntimeError(f"{' '.join(command)} failed:\n{tail}")
    return lines


def first(lines: list[tuple[float, str]], text: str, last: bool = False) -> float:
    found = [at for at, line in lines if text in line]
    if not found:
        raise RuntimeError(f"no line with {text!r}")
    return found[-1] if last else found[0]


# 1 and 2: the local cluster's time to first step, and rendezvous with the main node first/last
def local_cluster_start(main_first: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "local.cluster",
            "--run-dir",
            f"{folder}/run",
            *(["--main-first"] if main_first else []),
            "--",
            *SMALL,
        ]
        started = time.time()
        lines = timed_lines(command)
    last_node = first(lines, "[cluster] starting node", last=True)
    first_step = first(lines, "first step done")
    return {
        "to first step": first_step - started,
        "rendezvous": first_step - last_node,
        "total": lines[-1][0] - started,
    }


# 1: the rehearsal's boot phases, from the node's own timestamped logs
def rehearsal_phases() -> dict[str, float]:
    lines = timed_lines([sys.executable, "-m", "rehearsal.run", "--keep", "--", *SMALL])
    folder = Path(next(line for _, line in lines if "kept the work folder" in line).split()[-1])
    try:
        console = (folder / "node-0" / "console.log").read_text().splitlines()
        table = {
            m.group(1).strip(): float(m.group(2))
            for _, line in lines
            if (m := re.match(r"\[rehearsal\] (.+?)\s+(\d+\.\d)\s+ok$", line.strip()))
        }
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)

    def at(text: str) -> float:
        stamps = [stamp_of(line) for line in console if text in line]
        if not stamps or stamps[0] is None:
            raise RuntimeError(f"node 0 logged no {text!r}")
        return stamps[0]

    return {
        "synth": table["synth the app"],
        "create the stack": table["create the stack"],
        "payload fetch": at("phase install:") - at("phase payload:"),
        "install (rehearsal: skipped)": at("phase sharedfs:") - at("phase install:"),
        # On EC2 an NFS mount (boot.log's phase sharedfs); here the folder standing for it.
        "sharedfs (rehearsal: a folder)": at("phase agent:") - at("phase sharedfs:"),
        "agent start to waiting-for-main": at("[fabric-agent] node 0 of") - at("phase agent:"),
        "waiting for main + resolve": at("[fabric-agent] running:")
        - at("[fabric-agent] node 0 of"),
        "fabric run start to first step": at("first step done") - at("[fabric-agent] running:"),
        "boot to done": table["train (boot to done)"],
    }


# 3: samples/s, 1 x 1 vs 2 x 1, one thread per process
def throughput(nodes: int, payload: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        timed_lines(
            [
                sys.executable,
                "-m",
                "local.cluster",
                "--num-nodes",
                str(nodes),
                "--devices-per-node",
                "1",
                "--threads-per-process",
                "1",
                "--run-dir",
                f"{folder}/run",
                "--",
                "--epochs",
                "3",
                "--samples",
                "16384",
                *payload,
            ]
        )
        summary = json.loads(Path(f"{folder}/run/summary.json").read_text())
    return {"samples/s": summary["samples_per_s"]}


# 3: the main job (make local): the payload's default run on the 2 x 2 local cluster
def main_job(payload: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.time()
        lines = timed_lines(
            [sys.executable, "-m", "local.cluster", "--run-dir", f"{folder}/run", "--", *payload]
        )
        summary = json.loads(Path(f"{folder}/run/summary.json").read_text())
    return {
        "to first step": first(lines, "first step done") - started,
        "training": summary["wall_time_s"],
        "whole": lines[-1][0] - started,
        "samples/s": summary["samples_per_s"],
        "final loss": summary["final_loss"],
    }


# 3: the payload's step time vs a plain PyTorch loop (bench/overhead.py), one thread
# The payload's defaults before the benchmarks showed its per-step fixed costs.
OLD_DEFAULTS = ["--batch-size", "64", "--lr", "3e-3", "--hidden", "128"]


def fabric_overhead(pairs: int, payload: list[str]) -> dict[str, float]:
    lines = timed_lines(
        [sys.executable, "-m", "bench.overhead", "--pairs", str(pairs), "--", *payload],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(lines[-1][1])


# 4: synth time, and the test suite
def synth_time() -> dict[str, float]:
    code = (
        "import time, tempfile; t = time.perf_counter(); "
        "from stacks.cluster_app import build_app, cdk_json_context; "
        "app, _ = build_app(cdk_json_context(), outdir=tempfile.mkdtemp()); app.synth(); "
        "print(time.perf_counter() - t)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    )
    return {"seconds": float(result.stdout.strip().splitlines()[-1])}


def test_suite() -> tuple[float, list[str], int]:
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--durations=10", "-p", "no:cacheprovider"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.time() - started
    slowest = [
        line.strip()
        for line in result.stdout.splitlines()
        if re.match(r"^\d+\.\d+s (call|setup|teardown)", line.strip())
    ][:10]
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "tests/test_stack_template.py",
            "tests/test_stack_gpu.py",
            "tests/test_stack_options.py",
            "tests/test_stack_scale.py",
        ],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    template_tests = sum(1 for line in collected.splitlines() if "::" in line)
    if result.returncode != 0:
        slowest.insert(0, f"(the suite FAILED: exit status {result.returncode})")
    return wall, slowest, template_tests


# 5: installing the node requirements (but torch) into an empty venv, uv vs pip
def node_requirements(folder: Path) -> Path:
    lines = (PROJECT_DIR / "userdata" / "requirements-node.txt").read_text().splitlines()
    path = folder / "requirements.txt"
    path.write_text("\n".join(line for line in lines if not line.startswith("torch")) + "\n")
    return path


def install_time(tool: str, uv: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        requirements = node_requirements(Path(folder))
        venv = Path(folder) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if tool == "pip":
            command = [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-cache-dir",
                "-r",
                str(requirements),
            ]
        else:
            command = [
                str(uv),
                "pip",
                "install",
                "-q",
                "--no-cache",
                "--python",
                str(venv / "bin" / "python"),
                "-r",
                str(requirements),
            ]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return {"seconds": time.perf_counter() - started}


def pinned_uv(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(folder / "uv")], check=True)
    subprocess.run(
        [str(folder / "uv" / "bin" / "pip"), "install", "-q", f"uv=={UV_VERSION}"], check=True
    )
    return folder / "uv" / "bin" / "uv"


# 6: a spot notice mid-upload: notice to the newest checkpoint in S3, stop() vs stop_now()
def spot_checkpoint_upload(runs: int) -> dict[str, float]:
    """bench/spot_upload.py in a process of its own (moto's S3 and its memory go with it)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.spot_upload", "--runs", str(runs), "--json"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench.spot_upload failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-rehearsal", action="store_true")
    parser.add_argument(
        "--skip-spot-upload", action="store_true", help="3 GiB of checkpoints to an emulated S3"
    )
    args = parser.parse_args()
    runs = args.runs
    out: list[str] = [
        f"# Benchmarks ({datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
        f"{os.cpu_count()} cores, median of {runs} runs)",
        "",
    ]

    def section(
        title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("what", "figure")
    ) -> None:
        out.extend([f"## {title}", "", "| " + " | ".join(header) + " |"])
        out.append("|" + " --- |" * len(header))
        out.extend("| " + " | ".join(row) + " |" for row in rows)
        out.append("")
        print("\n".join(out[-(len(rows) + 5) :]), flush=True)

    main_last = repeat(runs, lambda: local_cluster_start(main_first=False))
    main_first = repeat(runs, lambda: local_cluster_start(main_first=True))
    section(
        "1-2. Local cluster (2 x 2): start to first step, rendezvous",
        [
            ("command start to first step, main node last", f"{main_last['to first step']:.1f} s"),
            (
                "last node start to first step (rendezvous), main node last",
                f"{main_last['rendezvous']:.1f} s",
            ),
            (
                "last node start to first step (rendezvous), main node first",
                f"{main_first['rendezvous']:.1f} s",
            ),
            (
                "rendezvous, main last / main first",
                f"{main_last['rendezvous'] / main_first['rendezvous']:.2f}x",
            ),
            ("whole run (2 epochs)", f"{main_last['total']:.1f} s"),
        ],
    )
    if not args.skip_rehearsal:
        phases = repeat(runs, rehearsal_phases)
        section(
            "1. Rehearsal (2 x 2): boot phases of node 0",
            [(name, f"{seconds:.2f} s") for name, seconds in phases.items()],
        )

    old = "old defaults (batch 64, lr 3e-3, hidden 128)"
    new = "defaults now (batch 256, lr 1e-2, hidden 256)"
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for name, payload in ((old, OLD_DEFAULTS), (new, [])):
        figures[name] = {
            "job": repeat(runs, lambda payload=payload: main_job(payload)),
            "one": repeat(runs, lambda payload=payload: throughput(1, payload)),
            "two": repeat(runs, lambda payload=payload: throughput(2, payload)),
            "overhead": fabric_overhead(10 * runs, [*payload, "--epochs", "2"]),
        }
    rows3: list[tuple[str, ...]] = [
        (what, *(show(figures[name]) for name in (old, new)))
        for what, show in (
            (
                "main job (`make local`, 20 epochs): start to first step",
                lambda f: f"{f['job']['to first step']:.1f} s",
            ),
            ("main job: training", lambda f: f"{f['job']['training']:.1f} s"),
            ("main job: whole run", lambda f: f"{f['job']['whole']:.1f} s"),
            (
                "main job: samples/s (4 processes on 2 cores)",
                lambda f: f"{f['job']['samples/s']:.0f}",
            ),
            ("main job: final loss", lambda f: f"{f['job']['final loss']:.3f}"),
            ("samples/s, 1 node x 1 device", lambda f: f"{f['one']['samples/s']:.0f}"),
            ("samples/s, 2 nodes x 1 device (loopback)", lambda f: f"{f['two']['samples/s']:.0f}"),
            (
                "scaling, 2 x 1 / 1 x 1 (ideal 2.00x)",
                lambda f: f"{f['two']['samples/s'] / f['one']['samples/s']:.2f}x",
            ),
            ("step time, payload (1 process)", lambda f: f"{f['overhead']['payload_ms']:.3f} ms"),
            (
                "step time, plain PyTorch loop (same process, in turns)",
                lambda f: f"{f['overhead']['plain_ms']:.3f} ms",
            ),
            (
                "Fabric overhead, payload / plain - 1, median of pairs (target < 5 %)",
                lambda f: f"{100 * f['overhead']['overhead']:.1f} %",
            ),
            (
                "payload's epoch-end work (all-reduce, CSV, checkpoint), share of its wall time",
                lambda f: f"{100 * f['overhead']['epoch_end_share']:.1f} %",
            ),
        )
    ]
    section("3. Training efficiency (1 thread per process)", rows3, ("what", old, new))

    synth = repeat(runs, synth_time)
    rows = [("synth of the app (with CloudFormation validation)", f"{synth['seconds']:.1f} s")]
    if not args.skip_tests:
        wall, slowest, template_tests = test_suite()
        modules_synths = 2 + 2 + 1 + 1  # parametrized fixtures: one synth per module and case
        rows += [
            ("test suite wall time (one run)", f"{wall:.0f} s"),
            (
                "template tests / synths they share",
                f"{template_tests} / {modules_synths}: one synth per test would add "
                f"{(template_tests - modules_synths) * synth['seconds']:.0f} s",
            ),
        ]
        rows += [(f"slowest test {i + 1}", f"`{line}`") for i, line in enumerate(slowest)]
    section("4. Synth and tests", rows)

    if not args.skip_install:
        with tempfile.TemporaryDirectory() as folder:
            uv = pinned_uv(Path(folder))
            pip_time = repeat(runs, lambda: install_time("pip", uv))
            uv_time = repeat(runs, lambda: install_time("uv", uv))
        section(
            "5. Node requirements but torch into an empty venv (no cache)",
            [
                ("pip install", f"{pip_time['seconds']:.1f} s"),
                (f"uv pip install (uv {UV_VERSION})", f"{uv_time['seconds']:.1f} s"),
                ("pip / uv", f"{pip_time['seconds'] / uv_time['seconds']:.1f}x"),
            ],
        )
    if not args.skip_spot_upload:
        section(spot_upload.TITLE, spot_upload.rows(spot_checkpoint_upload(runs)))
        out.extend([*spot_upload.NOTE, ""])
        print("\n".join(spot_upload.NOTE), flush=True)
    if not args.skip_rehearsal:  # one rehearsal: its figures are times of single events
        section(recovery.TITLE, recovery.rows(recovery.measure(1)))
    section(data_copy.TITLE, data_copy.rows(*data_copy.measure(runs)))
    RESULTS.write_text("\n".join(out))
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
