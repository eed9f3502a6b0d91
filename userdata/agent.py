"""The node agent: finds this node's rank and the main node, then runs `fabric run`.

    python -m userdata.agent [options] SCRIPT [-- SCRIPT_ARGS]

1. rank and node count from IMDSv2 instance tags, 2. the main address from SSM (waiting,
bounded, until node 0 has published it), 3. the interface that routes there and the thread
count, 4. `fabric run ...` (printed with --dry-run), 5. phase reporting, artifacts to S3 from
rank 0, and the guarded power-off when training ends.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from userdata.agent_log import log
from userdata.aws_clients import aws_client
from userdata.data_channels import DATA_DIR
from userdata.errors import AgentError
from userdata.fabric_command import PRECISIONS
from userdata.imds import Imds, read_identity
from userdata.node_groups import leave
from userdata.node_records import Records
from userdata.phase import PhaseReporter
from userdata.poweroff import power_off
from userdata.stop_handling import GAVE_WAY, TERMINATED, PeerFailed, stopped_from_outside
from userdata.training import train

NO_PHASE_RECORDED = "no phase recorded: this node's phase parameter is named by its rank"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m userdata.agent",
        description="Find this node's rank and the main node, then run `fabric run SCRIPT`.",
    )
    parser.add_argument("script", help="the training script, relative to --workdir")
    parser.add_argument(
        "script_args", nargs=argparse.REMAINDER, help="after --: arguments passed to the script"
    )
    parser.add_argument(
        "--main-address-parameter", required=True, help="SSM parameter holding node 0's private IP"
    )
    parser.add_argument(
        "--phase-parameter",
        default="",
        help="SSM parameter for this node's phase; {rank} is filled in",
    )
    parser.add_argument(
        "--members-parameter",
        default="",
        help="SSM parameter listing the cluster's instance ids by rank (CloudFormation's)",
    )
    parser.add_argument(
        "--stop-parameter",
        default="",
        help="SSM parameter where the first node that stops the cluster says why",
    )
    parser.add_argument(
        "--max-hours",
        type=float,
        default=0.0,
        help="the cost guard's power-off after this many hours (run-agent.sh schedules it): "
        "a stop then is recorded as max_hours, not as a failure",
    )
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--devices-per-node", type=int, default=1)
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="32-true", help="fabric run --precision"
    )
    parser.add_argument(
        "--efa",
        action="store_true",
        help="let NCCL use EFA (libfabric and aws-ofi-nccl of the Deep Learning AMI)",
    )
    parser.add_argument(
        "--efa-rdma",
        action="store_true",
        help="the instance type's EFA device has RDMA (p4d, p5, ...): GPUDirect RDMA on",
    )
    parser.add_argument("--main-port", type=int, default=29400)
    parser.add_argument("--run-dir", default="", help="where the payload writes its run")
    parser.add_argument(
        "--workdir",
        default="",
        help="the project folder: fabric run's working directory (default: the current one)",
    )
    parser.add_argument(
        "--artifacts-uri",
        default="",
        help="s3://bucket/stack/run: the run's files, restored from and copied to by rank 0",
    )
    parser.add_argument("--run-name", default="run", help="the run's name, for messages")
    parser.add_argument(
        "--inputs",
        default="",
        help="the run's inputs.json (data channels, variables, the secrets' names)",
    )
    parser.add_argument(
        "--data-dir",
        default=DATA_DIR,
        help="where the data channels are copied, on this node's own disk",
    )
    parser.add_argument(
        "--run-fingerprint",
        default="",
        help="what the nodes train (code, arguments, world): a complete run trained with "
        "another fingerprint (more epochs, new code) goes on",
    )
    parser.add_argument(
        "--peer-poll-interval",
        type=float,
        default=15.0,
        help="seconds between looks at the cluster's stop parameter (jittered)",
    )
    parser.add_argument(
        "--recover",
        metavar="CLUSTER",
        default="",
        help="each rank is an Auto Scaling group of CLUSTER (the stack's name, their "
        "fabric:cluster tag): node 0 publishes the main address and the members, and a node "
        "whose run is over scales its group to zero",
    )
    parser.add_argument(
        "--max-replacements",
        type=int,
        default=5,
        help="with --recover: times the cluster starts again with a replaced node in one run",
    )
    parser.add_argument(
        "--capacity-wait-minutes",
        type=float,
        default=30.0,
        help="with --recover: how long node 0 waits for every rank's group to hold an instance",
    )
    parser.add_argument(
        "--stop-when-done",
        action="store_true",
        help="power the node off when fabric run ends (only on real EC2)",
    )
    parser.add_argument(
        "--gpu-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for nvidia-smi to see every GPU (accelerator gpu)",
    )
    parser.add_argument(
        "--spot-poll-interval",
        type=float,
        default=5.0,
        help="seconds between looks at IMDS for a spot interruption notice",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times fabric run is started again after it fails",
    )
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=5.0,
        help="seconds between a failed fabric run and the next",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve everything, print the command line, run nothing",
    )
    parser.add_argument(
        "--main-address-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for node 0 to publish its address",
    )
    parser.add_argument(
        "--rendezvous-timeout",
        type=int,
        default=600,
        help="seconds torchrun waits for all nodes to join",
    )
    parser.add_argument("--imds-timeout", type=float, default=2.0)
    parser.add_argument(
        "--ssm-timeout", type=float, default=5.0, help="connect/read timeout of each SSM call"
    )
    parser.add_argument(
        "--sync-interval",
        type=float,
        default=60.0,
        help="seconds between artifact uploads from rank 0",
    )
    args = parser.parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    if args.devices_per_node < 1:
        parser.error("--devices-per-node must be at least 1")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    records = Records(PhaseReporter(None, None))
    status = 1
    try:
        status = train(args, records)
    except PeerFailed as error:
        records.silence_if_replaced()
        records.record(f"failed: {error}")
    except AgentError as error:
        # Before the rank is known there is no parameter to record the failure in: say so.
        reporter = records.phase
        unrecorded = bool(args.phase_parameter) and not args.dry_run and not reporter.parameter
        note = f" ({NO_PHASE_RECORDED})" if unrecorded else ""
        print(f"error: {error}{note}", file=sys.stderr, flush=True)
        records.silence_if_replaced()
        records.fail(str(error))
    except Exception as error:  # a bug or an AWS error nobody foresaw: still failed, still off
        traceback.print_exc()
        records.fail(f"{type(error).__name__}: {error}")
    finally:
        # Whatever happened, a node that is done does not bill (unless stopped from outside).
        done = args.stop_when_done and not TERMINATED.is_set() and not GAVE_WAY.is_set()
        if done and not leave_group(args):
            power_off(args.dry_run)
        elif TERMINATED.is_set() and "max_hours" in stopped_from_outside(args.max_hours):
            leave_group(args)  # the cost guard's power-off: a stopped node would be replaced
    return status


def leave_group(args: argparse.Namespace) -> bool:
    """recover: this node's group to zero, which terminates the instance (a node that only
    powers off would be replaced). Says whether it did; else the node powers off."""
    if not args.recover or args.dry_run:
        return False
    try:
        identity = read_identity(Imds(timeout=args.imds_timeout))
    except AgentError as error:
        print(f"[fabric-agent] cannot leave the group: {error}", flush=True)
        return False
    autoscaling = aws_client("autoscaling", identity.region, args.ssm_timeout)
    return leave(autoscaling, identity.instance_id, log)


if __name__ == "__main__":
    sys.exit(main())
