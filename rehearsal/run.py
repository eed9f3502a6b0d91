"""The rehearsal: deploy the real template to an emulated AWS and boot every node for real.

    python -m rehearsal.run [--num-nodes 2] [--devices-per-node 2]
                            [--project DIR --script FILE] [-- SCRIPT_ARGS]

1. synth the real app with cdk.json's settings; 2. deploy it to moto (CloudFormation, EC2,
SSM, S3, IAM) after bootstrapping it; 3. give every emulated instance a network namespace
holding its private IP, an IMDSv2 stub with its id and tags, and run its real user data there
(rehearsal switch: no systemd, no power-off; the default project reuses this venv, a --project
runs the nodes' real install phases, offline, from the uv cache that installing it here filled);
4. check the training (world size, artifacts in S3, every phase "done", the same result as a
local-cluster run); 5. destroy the stack
and check that only the artifacts bucket remains. Everything it made is removed, also on failure:
every process it starts carries the run's id in FABRIC_REHEARSAL_ID, and writes its temporary
files in the run's work folder.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

from rehearsal.inputs import SECRET_VARIABLE, VARIABLE
from rehearsal.namespaces import namespaces_available
from rehearsal.processes import RUN_ID_VARIABLE, work_folder
from rehearsal.report import Manifest, Phases, RehearsalError, log
from rehearsal.scenarios import rehearse

# A quarter of SSM's answers a ThrottlingException: every node must still train and record
# every phase (Parameter Store's throughput is shared by the whole account).
DEFAULT_THROTTLE = 0.25


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rehearsal.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--devices-per-node", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the training")
    parser.add_argument(
        "--main-node-delay",
        type=float,
        default=0.0,
        help="boot node 0 this many seconds after the others (a late main node)",
    )
    parser.add_argument("--project", help="your project's folder (default: the example, trainer/)")
    parser.add_argument("--script", help="with --project: the script, relative to it")
    parser.add_argument(
        "--runs",
        action="store_true",
        help="also watch the run (status, logs, results), then deploy again three times: "
        "the run resumed by a new cluster from S3, a complete run not trained again, a change "
        "of arguments a new run",
    )
    parser.add_argument(
        "--train-on",
        action="store_true",
        help="deploy again to train on (the script's --max-steps plus 10): a new cluster whose "
        "every rank must resume from the step the first one ended at, with identical replicas "
        "(a script that writes resumed_from and replicas_identical in its summary)",
    )
    parser.add_argument(
        "--recover",
        action="store_true",
        help="deploy with recover=true: each rank an Auto Scaling group of one instance; node 0 "
        "must publish its address and the members, and every node leave its group at the end",
    )
    parser.add_argument(
        "--max-replacements",
        type=int,
        help="with --lose-node: the max_replacements setting; 0 makes the run give up when "
        "the node is replaced: every node must record why and leave its group",
    )
    parser.add_argument(
        "--lose-node",
        type=int,
        help="with --recover: this node is lost without notice once the run has a checkpoint "
        "(its instance terminated, its processes killed); its group's replacement boots, and "
        "the cluster must go on to the end with every rank resumed from the same checkpoint",
    )
    parser.add_argument(
        "--restarted",
        action="store_true",
        help="the script fails once on a node mid-run (the example's --fail-once-at): every "
        "node must restart it, and every rank resume from the same newest checkpoint",
    )
    parser.add_argument(
        "--fail-node",
        type=int,
        help="with --project: this node's install fails (no package to be had); the others "
        "must stop within the bound and record why",
    )
    parser.add_argument(
        "--spot-node",
        type=int,
        help="this node gets a spot interruption notice once training has begun (EC2 tells "
        "the reclaimed instance only): the run must stop as interrupted, never complete, and "
        "a new cluster must resume it",
    )
    parser.add_argument(
        "--inputs",
        action="store_true",
        help="deploy with a data channel (in the emulated S3), a variable and a secret (a "
        "SecureString): the script must train on the channel and read both, every node hold "
        "the same files, a second start copy nothing, and the secret's value show nowhere",
    )
    parser.add_argument(
        "--throttle",
        type=float,
        default=DEFAULT_THROTTLE,
        help="share of SSM and CloudWatch Logs calls the emulated AWS refuses with "
        f"ThrottlingException, as a busy account does (default {DEFAULT_THROTTLE})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--manifest",
        type=Path,
        help="write what the run makes (its id, work folder, namespaces, links) to this file",
    )
    parser.add_argument(
        "script_args",
        nargs=argparse.REMAINDER,
        help="after --: the script's arguments (default: a short run)",
    )
    args = parser.parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    if (args.project is None) != (args.script is None):
        parser.error("--project and --script go together")
    if args.fail_node is not None and (args.project is None or args.runs):
        parser.error("--fail-node needs --project (a real install) and goes without --runs")
    if args.fail_node is not None and not 0 <= args.fail_node < args.num_nodes:
        parser.error(f"--fail-node must be from 0 to {args.num_nodes - 1}")
    if args.spot_node is not None and not 0 <= args.spot_node < args.num_nodes:
        parser.error(f"--spot-node must be from 0 to {args.num_nodes - 1}")
    if args.spot_node is not None and (
        args.runs or args.fail_node is not None or args.lose_node is not None
    ):
        parser.error("--spot-node goes without --runs, --fail-node and --lose-node")
    if args.max_replacements is not None and args.lose_node is None:
        parser.error("--max-replacements goes with --lose-node")
    if args.lose_node is not None and not (args.recover and 0 <= args.lose_node < args.num_nodes):
        parser.error(f"--lose-node needs --recover and a rank from 0 to {args.num_nodes - 1}")
    for flag in ("train_on", "restarted"):
        if getattr(args, flag) and (
            args.runs or args.fail_node is not None or args.spot_node is not None
        ):
            parser.error(
                f"--{flag.replace('_', '-')} goes without --runs, --fail-node and --spot-node"
            )
    if args.inputs and (args.project is not None or args.fail_node is not None):
        parser.error("--inputs goes with the example project (it reads the inputs) only")
    if not 0.0 <= args.throttle < 1.0:
        parser.error("--throttle must be at least 0 and below 1")
    if not args.script_args and args.project is None:
        args.script_args = ["--epochs", "2", "--samples", "4096"]
    if args.inputs:  # the example prints both (the node masks the secret) and records them
        args.script_args += ["--show-env", VARIABLE, "--show-env", SECRET_VARIABLE]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    warnings.filterwarnings("ignore", module="moto")
    reason = namespaces_available()
    if reason:
        print(f"[rehearsal] error: {reason}", file=sys.stderr)
        return 1

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)  # cleanup runs for SIGTERM as for Ctrl-C
    phases = Phases()
    run_id = uuid.uuid4().hex
    manifest = Manifest(args.manifest)
    log(f"run {run_id} (in {RUN_ID_VARIABLE} of every process it starts)")
    try:
        with work_folder(args.keep) as folder:
            manifest.update(
                run_id=run_id, marker=f"{RUN_ID_VARIABLE}={run_id}", work_folder=str(folder)
            )
            rehearse(args, folder, phases, run_id, manifest)
    except RehearsalError as error:
        phases.report()
        print(f"[rehearsal] error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[rehearsal] interrupted; everything it made is removed", file=sys.stderr)
        return 130
    phases.report()
    log("rehearsal passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
