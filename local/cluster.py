"""The local cluster: N real `fabric run` nodes on this machine, talking over 127.0.0.1.

    python -m local.cluster [--num-nodes 2] [--devices-per-node 2] [--run NAME]
                            [--project DIR --script FILE|"-m MODULE"] [--accelerator cpu|gpu]
                            [--precision P] [-- SCRIPT_ARGS]

It runs what ships: a staged copy of the project's shipped files (what the payload asset
holds), with the script's working directory in it, as on a node; what the script writes there
is kept in the run folder's outputs/. With --project, in a venv that the nodes' own install
step made for it (cached in .venvs/ until its dependency files change); by default the deploy's
default project (trainer/, train.py) in this project's venv. `--script FILE` alone runs that
file where it is (a quick check of one file, not what ships).

Every rank runs the script through userdata/launch.py: a script error before the first
training step (an import, its arguments) stops the cluster at once with the error as the last
line, never restarted; a node whose ranks all finished their script has ended well, whatever
its exit status. A run remembers its script arguments (local/runs.py).

Each node is its own `fabric run --node-rank=R --main-address=127.0.0.1 ...` process group,
started last rank first (as on EC2, nodes come up in any order). Output is prefixed with the
node rank. If a node fails, the others are stopped and the command exits non-zero naming it;
Ctrl-C stops everything. No process it started outlives it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from local import runs
from local.nodes import MAIN_ADDRESS, Node, script_error, start_nodes, stop_all, wait_for_nodes
from local.script_env import script_environment
from training_project.errors import ProjectError
from userdata.fabric_command import PRECISIONS
from userdata.launch_status import outcome
from userdata.outputs import OUTPUTS
from userdata.run_inputs import InputError
from userdata.run_layout import CHECKPOINT_STEP, PROGRESS_FILE, RUN_NAME

RUNS = Path("runs/local")
# The deploy's default project (cdk.json: project, script), staged as it ships.
DEFAULT_PROJECT = Path(__file__).resolve().parent.parent / "trainer"
DEFAULT_SCRIPT = "train.py"


class ProjectInstallFailed(RuntimeError):
    """The project's dependencies could not be installed; the message is the installer's."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((MAIN_ADDRESS, 0))
        return int(probe.getsockname()[1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m local.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--devices-per-node", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "cuda"))
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fabric run --precision (default: 32-true on cpu; on a GPU bf16-mixed where it "
        "has bfloat16, else 16-mixed)",
    )
    parser.add_argument(
        "--project",
        help="your project's folder: its script runs there, with its own dependencies",
    )
    parser.add_argument(
        "--script",
        help=f"with --project: a file inside it, or '-m MODULE' (default: {DEFAULT_PROJECT.name}/"
        f"{DEFAULT_SCRIPT}, staged as it ships); alone: a file run where it is",
    )
    parser.add_argument(
        "--run",
        help="the run: a new one each time by default (runs/local/<date-time>, "
        "runs/local/latest points at the newest); an existing name continues that run",
    )
    parser.add_argument(
        "--run-dir", help="the payload's run directory (FABRIC_RUN_DIR), instead of --run"
    )
    parser.add_argument("--runs", default=str(RUNS), help="where runs live (default: %(default)s)")
    parser.add_argument("--main-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--rendezvous-timeout", type=int, default=120)
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times all nodes are started again after one fails",
    )
    parser.add_argument(
        "--main-first",
        action="store_true",
        help="start node 0 first (default: last, as a late main node on EC2)",
    )
    parser.add_argument(
        "--threads-per-process",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of each process (default: cores / all processes)",
    )
    parser.add_argument(
        "--main-node-delay",
        type=float,
        default=0.0,
        help="start node 0 this many seconds after the others (a late main node)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a variable for the script (repeatable; wins over --env-file), as -c env= on EC2",
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="a .env file of variables for the script (keys, tokens): what -c secrets= and "
        "-c env= give on EC2",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="a local folder, the script's $FABRIC_DATA_DIR (on EC2: the data channel's copy)",
    )
    parser.add_argument(
        "script_args", nargs=argparse.REMAINDER, help="after --: arguments passed to the script"
    )
    args = parser.parse_args(argv)
    try:
        args.script_env = script_environment(args)
    except InputError as error:
        parser.error(str(error))
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    if not 1 <= args.num_nodes <= 64:
        parser.error("--num-nodes must be from 1 to 64")
    if args.devices_per_node < 1:
        parser.error("--devices-per-node must be at least 1")
    if args.max_restarts < 0 or args.main_node_delay < 0:
        parser.error("--max-restarts and --main-node-delay must be at least 0")
    if args.project is None and args.script is not None:
        if not Path(args.script).is_file():
            parser.error(f"--script {args.script}: no such file")
    elif args.project is not None and args.script is None:
        parser.error("--project needs --script: the script to run, relative to the project")
    if args.run and args.run_dir:
        parser.error("--run and --run-dir go apart: a run's directory is runs/local/<run>")
    if args.run and not RUN_NAME.fullmatch(args.run):
        parser.error(f"--run {args.run!r}: letters, digits, . _ - (up to 64)")
    if not args.run_dir:
        args.run = args.run or datetime.now().strftime("%Y%m%d-%H%M%S")
        args.run_dir = str(Path(args.runs) / args.run)
    args.run_dir = str(Path(args.run_dir).resolve())  # the nodes may run in the project folder
    return args


def start_run(args: argparse.Namespace) -> bool:
    """Makes the run's directory the newest (runs/local/latest) and settles the script's
    arguments (local/runs.py); False if the run has ended already with them: trained again,
    it would train nothing and look broken."""
    run_dir = Path(args.run_dir)
    begun = runs.start(run_dir, list(args.script_args))
    name = args.run or str(run_dir)
    if begun.complete:
        print(
            f"[cluster] run {name} is complete already ({run_dir}); to train again, start a "
            "new run (leave out --run, or pass a new name), or continue it with other "
            "arguments (more epochs)",
            flush=True,
        )
        return False
    if begun.note:
        print(f"[cluster] run {name} {begun.note}", flush=True)
    args.script_args = begun.script_args
    runs.record_args(run_dir, args.script_args)
    if args.run:
        latest = Path(args.runs) / "latest"
        latest.unlink(missing_ok=True)
        latest.symlink_to(args.run)
        print(f"[cluster] run {args.run}: {run_dir} ({latest})", flush=True)
    return True


def continue_command(args: argparse.Namespace) -> str:
    where = f"--run {args.run}" if args.run else f"--run-dir {args.run_dir}"
    return f'make local ARGS="{where}"'


def newest_step(run_dir: Path) -> int | None:
    """Where a continued run resumes: its newest checkpoint's step, else the script's own
    progress.json (a script without step-N checkpoints)."""
    steps = [
        int(match.group(1))
        for path in run_dir.rglob("*")
        if (match := CHECKPOINT_STEP.search(path.name))
    ]
    if steps:
        return max(steps)
    try:
        step = json.loads((run_dir / PROGRESS_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def interrupted(args: argparse.Namespace) -> str:
    step = newest_step(Path(args.run_dir))
    where = f"at step {step}" if step is not None else "before its first checkpoint"
    return f"[cluster] interrupted {where}; continue with {continue_command(args)}"


def prepare_project(args: argparse.Namespace) -> None:
    """The project as it ships: checked as synth checks it, staged, with --project in the venv
    of its own (cached). `--script FILE` alone: that file where it is, in this venv."""
    args.python, args.workdir, args.stage = sys.executable, None, None
    if args.project is None and args.script is not None:
        return
    # Here only: a GPU machine's python (make gpu-check) has none of what projects need.
    from local.staging import Stage
    from training_project.load import load_project
    from training_project.torch_pins import pinned_version

    folder = args.project if args.project is not None else str(DEFAULT_PROJECT)
    script = args.script or DEFAULT_SCRIPT
    project = load_project(folder, script, Path.cwd(), pinned_version("torch"))
    if args.project is not None:
        from local.project_venv import InstallError, project_venv

        try:
            venv = project_venv(project, args.accelerator)
        except InstallError as error:
            raise ProjectInstallFailed(str(error)) from None
        args.python = str(venv / "bin" / "python")
    args.stage = Stage(project.path)
    print(
        f"[cluster] project {project.path}: {args.stage.files} shipped file(s) staged in "
        f"{args.stage.path}",
        flush=True,
    )
    args.workdir, args.script = args.stage.path, project.script


def keep_outputs(args: argparse.Namespace) -> None:
    """What the script wrote into the staged copy: into the run folder, as node 0 keeps it."""
    if args.stage is None:
        return
    skipped = args.stage.keep_outputs(Path(args.run_dir))
    for line in skipped:
        print(f"[cluster] outputs: left out {line}", flush=True)


def check_gpus(args: argparse.Namespace) -> None:
    """One GPU cannot host two NCCL ranks ("Duplicate GPU detected"): say so before starting."""
    import torch  # here only: the cpu path needs no torch in this process

    ranks, gpus = args.num_nodes * args.devices_per_node, torch.cuda.device_count()
    if ranks > gpus:
        raise SystemExit(
            f"[cluster] error: {args.num_nodes} node(s) x {args.devices_per_node} device(s) "
            f"need {ranks} GPUs, torch sees {gpus}: one GPU cannot host two NCCL ranks"
        )


def default_precision(accelerator: str) -> str:
    if accelerator == "cpu":
        return "32-true"
    import torch

    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def report(run_dir: Path) -> None:
    if (run_dir / OUTPUTS).is_dir():
        print(f"[cluster] outputs: {run_dir / OUTPUTS} (what the script wrote beside itself)")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        print(f"[cluster] done; no summary at {summary_path} (the script did not write one)")
        return
    summary = json.loads(summary_path.read_text())
    print("[cluster] done:", json.dumps(summary, indent=2))
    print(f"[cluster] summary:    {summary_path}")
    for key in ("checkpoint", "metrics", "plot"):
        if key in summary:
            print(f"[cluster] {key + ':':<11} {summary[key]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare_project(args)
    except ProjectError as error:
        print(f"[cluster] error: {error}", file=sys.stderr, flush=True)
        return 2
    except ProjectInstallFailed as error:
        print(f"[cluster] error: install: {error}", file=sys.stderr, flush=True)
        return 1
    status_root = Path(tempfile.mkdtemp(prefix="fabric-launch-"))
    try:
        return run_cluster(args, status_root)
    finally:
        shutil.rmtree(status_root, ignore_errors=True)
        if args.stage is not None:
            args.stage.close()


def run_cluster(args: argparse.Namespace, status_root: Path) -> int:
    if args.accelerator != "cpu":
        check_gpus(args)
    args.precision = args.precision or default_precision(args.accelerator)
    if not start_run(args):
        return 0

    def on_sigterm(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_sigterm)
    for attempt in range(args.max_restarts + 1):
        port = args.main_port or free_port()
        print(
            f"[cluster] {args.num_nodes} node(s) x {args.devices_per_node} device(s) on "
            f"{MAIN_ADDRESS}:{port}, precision {args.precision}, run dir {args.run_dir}",
            flush=True,
        )
        nodes: list[Node] = []
        try:
            start_nodes(args, port, nodes, status_root)
            failed = wait_for_nodes(nodes, args.devices_per_node)
        except KeyboardInterrupt:
            for node in nodes:  # torchrun's and torch's tracebacks as they die: not news
                node.muted.set()
            stop_all(nodes)
            keep_outputs(args)
            print(interrupted(args), file=sys.stderr, flush=True)
            return 130
        stop_all(nodes)  # nothing is left running, whatever happened
        keep_outputs(args)
        if not failed:
            runs.mark_complete(Path(args.run_dir), args.run or "", list(args.script_args))
            report(Path(args.run_dir))
            return 0
        error = script_error(nodes, args.devices_per_node)
        if error:  # the same code would fail the same way: no restart
            print(f"[cluster] error: {error}", file=sys.stderr, flush=True)
            return 1
        said = outcome(failed.status_dir, args.devices_per_node).error
        what = f"node {failed.rank} exited with status {failed.process.returncode}"
        what += f" ({said})" if said else ""
        if attempt == args.max_restarts:
            gave_up = f"; gave up after {attempt} restart(s)" if attempt else ""
            print(
                f"[cluster] error: {what}; stopped the other nodes{gave_up}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        print(
            f"[cluster] {what}: stopped the other nodes; restart {attempt + 1} of "
            f"{args.max_restarts} (the run resumes from its newest checkpoint)",
            flush=True,
        )
    return 1


if __name__ == "__main__":
    sys.exit(main())
