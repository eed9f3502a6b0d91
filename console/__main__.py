"""`python -m console <command>`: status, logs, results and runs of a deployed cluster.

Every failure a user can act on (AWS refusing, throttling, a failed download, a full disk) is
one `error: ...` line with exit status 2, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from console.aws import (
    Aws,
    ConsoleError,
    Stack,
    connect,
    default_stack_name,
    explain,
    load_stack,
)
from console.logs import parse_since, run_logs
from console.results import run_results, run_runs
from console.scaling import run_scale
from console.status import run_status
from console.storage import run_destroy_storage, storage_bucket


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class Console(click.Group):
    """Every failure a user can act on is one line on stderr, `error: ...`, exit status 2;
    Ctrl-C is 130. Nothing reaches the user as a traceback but a bug."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.ClickException as error:  # a bad option or value
            fail(f"{' '.join(error.format_message().split())} (see --help)", error.exit_code)
        except click.Abort:
            sys.exit(130)
        except (ConsoleError, BotoCoreError, ClientError, Boto3Error) as error:
            fail(explain(error) or str(error))
        except BrokenPipeError:  # `... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        sys.exit(code if isinstance(code, int) else 0)


def stack_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--region",
        default=None,
        help="AWS region (default: AWS_REGION, then AWS_DEFAULT_REGION or the profile's, "
        "as the CDK CLI chooses).",
    )(command)
    return click.option(
        "--stack",
        "stack_name",
        default=default_stack_name(),
        show_default=True,
        help="The CloudFormation stack (default: cdk.json's stack_name).",
    )(command)


@click.group(cls=Console, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Watch a deployed fabric cluster: its nodes, logs, runs and results."""


@cli.command()
@stack_options
@click.option("--watch", is_flag=True, help="Redraw until the run completes or fails.")
@click.option(
    "--interval",
    type=click.FloatRange(min=1),
    default=10.0,
    show_default=True,
    help="Seconds between redraws with --watch.",
)
@click.pass_context
def status(
    ctx: click.Context, stack_name: str, region: str | None, watch: bool, interval: float
) -> None:
    """Nodes, phases and the run's progress.

    Exit status: 0 in progress or complete, 1 failed (or stopped before completing).
    """
    aws = connect(region)
    ctx.exit(run_status(aws, load_stack(aws, stack_name), watch, interval))


@cli.command()
@stack_options
@click.option("--node", type=click.IntRange(min=0), default=None, help="Only this node (its rank).")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing new lines until Ctrl-C (a line shipped up to 2 min late still shows).",
)
@click.option(
    "--since",
    default="1h",
    show_default=True,
    help="How far back: 30m, 2h, 1d, 1h30m, or all.",
)
@click.pass_context
def logs(
    ctx: click.Context,
    stack_name: str,
    region: str | None,
    node: int | None,
    follow: bool,
    since: str,
) -> None:
    """The nodes' log lines, merged in time order.

    Each line is prefixed [node R].
    """
    window = parse_since(since)  # a typo fails before any AWS call
    aws = connect(region)
    stack = load_stack(aws, stack_name)
    ctx.exit(run_logs(aws, stack, node, follow, window, click.echo, warn=warn))


@cli.command()
@stack_options
@click.pass_context
def stop(ctx: click.Context, stack_name: str, region: str | None) -> None:
    """Stop a cluster of groups (recover=true): every rank's group to zero.

    Each node terminates as on a stop from outside (node 0 uploads the newest checkpoint
    first); nothing is replaced. make resume continues the run.
    """
    aws = connect(region)
    ctx.exit(run_scale(aws, load_stack(aws, stack_name), 0, click.echo))


@cli.command()
@stack_options
@click.pass_context
def resume(ctx: click.Context, stack_name: str, region: str | None) -> None:
    """Bring a stopped cluster of groups back: one instance per rank, continuing the run."""
    aws = connect(region)
    ctx.exit(run_scale(aws, load_stack(aws, stack_name), 1, click.echo))


def warn(text: str) -> None:
    click.echo(text, err=True)


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def ask(question: str) -> bool:
    return click.confirm(question, default=False, err=True)


def _stack_or_hint(aws: Aws, stack_name: str, hint: str) -> Stack:
    try:
        return load_stack(aws, stack_name)
    except ConsoleError as error:
        raise ConsoleError(f"{error} ({hint})") from error


@cli.command()
@stack_options
@click.option("--run", "run_name", default=None, help="A run (default: the stack's current run).")
@click.option(
    "--bucket",
    default=None,
    help="The artifacts bucket (default: the stack's); with --run the stack may be gone.",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    show_default=True,
    help="Files go to DEST/<stack>/<run>/.",
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Every checkpoint ever saved (default: only the newest; S3 bills each GB).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before downloading over 1 GiB.")
@click.pass_context
def results(
    ctx: click.Context,
    stack_name: str,
    region: str | None,
    run_name: str | None,
    bucket: str | None,
    dest: Path,
    everything: bool,
    yes: bool,
) -> None:
    """Download a run's files, show its summary.

    Downloads the small files and the newest checkpoint (--all: every checkpoint), after
    saying how much; over 1 GiB it asks first on a terminal (--yes does not ask; declined:
    nothing is downloaded, exit status 1). Prints the
    summary and the local paths of the summary, the plot and the newest checkpoint.
    Temporary files (.tmp, .partial, .unreadable) are skipped.
    """
    aws = connect(region)
    if run_name is None or bucket is None:  # a deleted stack's run needs only the bucket
        stack = _stack_or_hint(aws, stack_name, "for a deleted stack's run: --run R --bucket B")
        run_name = run_name or stack.run
        bucket = bucket or stack.bucket
    confirm = None if yes or not stdin_is_terminal() else ask
    ctx.exit(run_results(aws, stack_name, bucket, run_name, dest, click.echo, everything, confirm))


def storage_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--storage",
        "storage_name",
        default=default_stack_name(key="storage_stack"),
        show_default=True,
        help="The storage stack (default: cdk.json's storage_stack).",
    )(command)


@cli.command()
@stack_options
@storage_option
@click.option("--bucket", default=None, help="The artifacts bucket (default: the stack's).")
@click.pass_context
def runs(
    ctx: click.Context,
    stack_name: str,
    region: str | None,
    storage_name: str,
    bucket: str | None,
) -> None:
    """The runs this stack has made, newest first, also when the stack is gone (they are in
    the storage stack's bucket).

    * marks the run the stack trains now.
    """
    aws = connect(region)
    current = None
    if bucket is None:
        try:
            stack = load_stack(aws, stack_name)
            bucket, current = stack.bucket, stack.outputs.get("RunName")
        except ConsoleError as gone:  # destroyed: its runs are in the storage stack's bucket
            try:
                bucket = storage_bucket(aws, storage_name)
            except ConsoleError:
                raise ConsoleError(
                    f"{gone} (nor a storage stack {storage_name} with its runs: pass "
                    "--storage S or --bucket B)"
                ) from None
    else:
        try:  # only to mark the current run: the stack may be gone
            current = load_stack(aws, stack_name).outputs.get("RunName")
        except ConsoleError:
            current = None
    ctx.exit(run_runs(aws, stack_name, bucket, current, click.echo))


@cli.command("destroy-storage")
@storage_option
@click.option("--region", default=None, help="AWS region (as for the other commands).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (for scripts): delete at once.")
@click.pass_context
def destroy_storage(ctx: click.Context, storage_name: str, region: str | None, yes: bool) -> None:
    """Delete the storage stack and what it holds: every run of every cluster in its bucket
    (all versions) and the nodes' logs. Says what that is first and asks; refuses while a
    cluster stack uses it."""
    aws = connect(region)
    if not yes and not stdin_is_terminal():
        raise ConsoleError(
            "destroy-storage deletes every run and log for good: run it in a terminal to be "
            "asked, or pass --yes"
        )
    ctx.exit(run_destroy_storage(aws, storage_name, click.echo, None if yes else ask))


if __name__ == "__main__":
    cli(prog_name="python -m console")
