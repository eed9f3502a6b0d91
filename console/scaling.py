"""`stop` and `resume` of a cluster whose ranks are Auto Scaling groups (recover=true): every
group to zero (each instance terminates; node 0 uploads the newest checkpoint first, as on any
stop from outside), or back to one instance per rank, which continues the run (the new node 0
publishes the next generation, restores the run and goes on from its newest checkpoint)."""

from __future__ import annotations

from collections.abc import Callable

from console.aws import GROUP_OUTPUT, Aws, ConsoleError, Stack

NO_GROUPS = (
    "stack {name} has no group per rank (it was deployed with recover=false): make stop and "
    "make resume need recover=true; without it, make destroy, then make deploy continues the run"
)


def rank_groups(stack: Stack) -> dict[int, str]:
    groups = {
        int(match.group(1)): value
        for key, value in stack.outputs.items()
        if (match := GROUP_OUTPUT.match(key))
    }
    if not groups:
        raise ConsoleError(NO_GROUPS.format(name=stack.name))
    return dict(sorted(groups.items()))


def run_scale(aws: Aws, stack: Stack, size: int, echo: Callable[[str], None]) -> int:
    """Every rank's group to `size` (0 or 1) instances; says what it did, rank by rank."""
    autoscaling = aws.client("autoscaling")
    groups = rank_groups(stack)
    for rank, name in groups.items():
        autoscaling.update_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=size, MaxSize=1, DesiredCapacity=size
        )
        echo(f"node {rank}: group {name} at {size}")
    if size:
        echo(
            f"{len(groups)} node(s) launching: run {stack.outputs.get('RunName', '?')} goes on "
            "from its newest checkpoint (make status --watch)"
        )
    else:
        echo(
            f"{len(groups)} node(s) terminating: node 0 uploads the newest checkpoint first; "
            "make resume continues the run"
        )
    return 0
