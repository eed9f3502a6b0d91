"""Records a boot phase for this node: `python -m userdata.report --phase-parameter P PHASE`.

A `failed: ...` phase also stops the cluster (the stop parameter), so that the other nodes do
not wait for this one in the rendezvous."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from userdata.aws_clients import aws_client
from userdata.errors import AgentError
from userdata.imds import Imds
from userdata.node_records import Records, cluster_control, identify
from userdata.phase import PhaseReporter

FAILED_PREFIX = "failed: "


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userdata.report", description=__doc__)
    parser.add_argument("--phase-parameter", required=True, help="{rank} is filled in")
    parser.add_argument("--members-parameter", default="")
    parser.add_argument("--stop-parameter", default="")
    parser.add_argument("phase")
    args = parser.parse_args(argv)
    try:
        identity = identify(Imds())  # a failure names the instance
    except AgentError as error:
        print(f"error: cannot record phase {args.phase!r}: {error}", file=sys.stderr)
        return 1
    ssm = aws_client("ssm", identity.region, 5.0)
    parameter = args.phase_parameter.format(rank=identity.node_rank)
    records = Records(
        PhaseReporter(ssm, parameter, identity.instance_id), cluster_control(ssm, args, identity)
    )
    if args.phase.startswith(FAILED_PREFIX):
        records.fail(args.phase.removeprefix(FAILED_PREFIX))
    else:
        records.record(args.phase)
    return 0


if __name__ == "__main__":
    sys.exit(main())
