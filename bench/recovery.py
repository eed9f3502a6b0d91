"""A reclaimed node's run training again (issue 23), from the rehearsal: recover=true, 2 x 1,
a spot notice on node 1 mid-epoch; its group replaces it, node 0 publishes the next generation.

    python -m bench.recovery [--runs 1] [--json]

Each figure comes from the arrival time of the rehearsal's own output lines (the nodes' output
is relayed live): the notice on node 1, node 0's checkpoint at that step ("stopping on request
at step N"), the replacement's `fabric run` start, and the first step after the restore. The
emulated Auto Scaling launches the replacement at once and its boot skips the installs, so
the EC2 figure is on paper: EC2's launch and the boot's phases come on top of ours.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

from stacks.config import PROJECT_DIR

TITLE = "7. Recovery (recover=true, issue 23): a spot notice on node 1 to training again"
ARGS = ["--epochs", "1", "--samples", "40000", "--batch-size", "16", "--hidden", "32"]
# On paper, EC2: a replacement's launch to running, and the boot phases before the agent (uv,
# the venv, the payload, the install of torch and the project on a CPU node; more on a GPU AMI).
EC2_LAUNCH_S = 60.0
EC2_BOOT_S = 120.0


def one_run() -> dict[str, float]:
    command = [
        sys.executable, "-m", "rehearsal.run", "--recover", "--spot-node", "1",
        "--devices-per-node", "1", "--", *ARGS, "--log-every", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines = [(time.monotonic(), line) for line in process.stdout]
    if process.wait() != 0:
        raise RuntimeError("the rehearsal failed:\n" + "".join(line for _, line in lines[-40:]))

    def first(pattern: str, after: float = 0.0) -> tuple[float, re.Match[str]]:
        for when, line in lines:
            if when >= after and (match := re.search(pattern, line)):
                return when, match
        raise RuntimeError(f"no line matching {pattern!r}")

    notice, _ = first(r"\[node 1\].*spot interruption notice:")
    saved, stopped = first(r"\[node 0\] stopping on request at step (\d+): saved", notice)
    running, _ = first(r"\[node 1\].*\[fabric-agent\] running: fabric run", saved)
    resumed, at = first(r"\[node 0\] resumed from .* at step (\d+)", notice)
    step, _ = first(r"first step done \(step", resumed)
    return {
        "notice to checkpoint durable": saved - notice,
        "notice to replacement running": running - notice,
        "replacement running to first step after the restore (resume_s)": step - running,
        "notice to training again": step - notice,
        "steps lost": float(int(stopped.group(1)) - int(at.group(1))),
    }


def measure(runs: int) -> dict[str, float]:
    samples = [one_run() for _ in range(runs)]
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


def rows(figures: dict[str, float]) -> list[tuple[str, str]]:
    found = [(name, f"{value:.1f} s") for name, value in figures.items() if name != "steps lost"]
    found.append(("steps lost", f"{figures['steps lost']:.0f}"))
    ours = figures["replacement running to first step after the restore (resume_s)"]
    on_paper = EC2_LAUNCH_S + EC2_BOOT_S + ours
    found.append(
        (
            "on paper, EC2: launch (~60 s) + boot phases (~120 s, CPU node) + resume_s",
            f"{on_paper:.0f} s ({ours / on_paper:.0%} of it ours)",
        )
    )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = measure(args.runs)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"## {TITLE}\n\n| what | figure |\n| --- | --- |")
    for name, value in rows(figures):
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
