"""Records a boot phase for this node: `python -m userdata.report --phase-parameter P PHASE`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from userdata.agent import aws_client, identify
from userdata.errors import AgentError
from userdata.imds import Imds
from userdata.phase import PhaseReporter


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userdata.report", description=__doc__)
    parser.add_argument("--phase-parameter", required=True, help="{rank} is filled in")
    parser.add_argument("phase")
    args = parser.parse_args(argv)
    try:
        identity = identify(Imds())  # a failure names the instance
    except AgentError as error:
        print(f"error: cannot record phase {args.phase!r}: {error}", file=sys.stderr)
        return 1
    parameter = args.phase_parameter.format(rank=identity.node_rank)
    PhaseReporter(aws_client("ssm", identity.region, 5.0), parameter).record(args.phase)
    return 0


if __name__ == "__main__":
    sys.exit(main())
