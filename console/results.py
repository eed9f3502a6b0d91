"""`results` (download one run's files and show its summary) and `runs` (the runs a stack
has made), both reading `s3://<bucket>/<stack>/<run>/`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from console import NO_VALUE, format_number, format_pairs, format_table, format_time
from console.aws import Aws, ConsoleError, S3Object, list_objects, list_prefixes, read_json
from userdata.run_layout import COMPLETE_MARKER, PROGRESS_FILE

EPOCH = datetime.fromtimestamp(0, UTC)


def is_temporary(key: str) -> bool:
    """Names a file carries while it is being written, or a torn checkpoint set aside at
    resume: never a result (the agent does not upload them, but an older one might have)."""
    name = key.rsplit("/", 1)[-1]
    return ".tmp" in name or name.endswith((".partial", ".unreadable"))


def run_prefix(stack: str, run: str) -> str:
    return f"{stack}/{run}/"


def no_run_error(run: str, bucket: str, stack: str, runs: Sequence[str]) -> ConsoleError:
    known = ", ".join(runs) if runs else "none"
    return ConsoleError(f"no run {run} in s3://{bucket}/{stack}/ (runs: {known})")


def relative_path(key: str, prefix: str) -> PurePosixPath | None:
    """The object's path inside the run; None for a folder marker or a key that would leave
    the destination folder ("..", absolute)."""
    relative = PurePosixPath(key[len(prefix) :])
    if not key[len(prefix) :] or key.endswith("/") or ".." in relative.parts:
        return None
    if relative.is_absolute():
        return None
    return relative


def newest_checkpoint(objects: Sequence[S3Object]) -> S3Object | None:
    checkpoints = [item for item in objects if item.key.endswith(".ckpt")]
    return max(checkpoints, key=lambda item: (item.modified, item.key), default=None)


def plot_object(objects: Sequence[S3Object], summary: dict[str, Any] | None) -> S3Object | None:
    """The summary's own "plot" (by file name: it holds a node's path), else loss.png."""
    named = (summary or {}).get("plot")
    names = [PurePosixPath(named).name] if isinstance(named, str) and named else []
    names.append("loss.png")
    for name in names:
        for item in objects:
            if item.key.rsplit("/", 1)[-1] == name:
                return item
    return None


@dataclass(frozen=True)
class Download:
    key: str
    path: Path
    size: int
    fetched: bool  # False: the same file was already here


def _unchanged(path: Path, item: S3Object) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return stat.st_size == item.size and int(stat.st_mtime) == int(item.modified.timestamp())


def download_run(
    aws: Aws,
    bucket: str,
    prefix: str,
    objects: Sequence[S3Object],
    dest: Path,
    fetching: Callable[[PurePosixPath, int], None] = lambda path, size: None,
) -> tuple[list[Download], list[str]]:
    """Downloads into a temporary name and renames, so an interrupted download never leaves
    a file that looks complete; a file already here (same size and time) is not fetched."""
    s3 = aws.client("s3")
    downloads, skipped = [], []
    for item in objects:
        relative = relative_path(item.key, prefix)
        if relative is None:
            continue
        if is_temporary(item.key):
            skipped.append(item.key)
            continue
        path = dest.joinpath(*relative.parts)
        if _unchanged(path, item):
            downloads.append(Download(item.key, path, item.size, fetched=False))
            continue
        fetching(relative, item.size)  # before: a checkpoint can take a while
        partial = path.with_name(path.name + ".download")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item.key, str(partial))
            stamp = item.modified.timestamp()
            os.utime(partial, (stamp, stamp))
            partial.replace(path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise ConsoleError(f"cannot write {path}: {error.strerror or error}") from error
        except BaseException:  # Ctrl-C, an AWS error: no half file left behind
            partial.unlink(missing_ok=True)
            raise
        downloads.append(Download(item.key, path, item.size, fetched=True))
    return downloads, skipped


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def format_results(
    downloads: Sequence[Download],
    skipped: Sequence[str],
    summary: dict[str, Any] | None,
    paths: dict[str, Path | None],
) -> str:
    fetched = sum(download.fetched for download in downloads)
    lines = [
        f"{fetched} file(s) downloaded, {len(downloads) - fetched} already here, "
        f"{len(skipped)} temporary skipped"
    ]
    if summary is None:
        lines += ["no summary.json: the run has not finished, or its script writes none", ""]
    else:
        lines += ["", "summary.json:", json.dumps(summary, indent=2, sort_keys=False), ""]
    rows = [[what, str(path) if path else NO_VALUE] for what, path in paths.items()]
    lines.append(format_pairs(rows))
    return "\n".join(lines)


def run_results(
    aws: Aws,
    stack: str,
    bucket: str,
    run: str,
    dest_root: Path,
    echo: Callable[[str], None],
) -> int:
    prefix = run_prefix(stack, run)
    objects = list_objects(aws, bucket, prefix)
    if not objects:
        raise no_run_error(run, bucket, stack, list_prefixes(aws, bucket, f"{stack}/"))
    dest = dest_root / stack / run
    echo(f"s3://{bucket}/{prefix} -> {dest}/")
    downloads, skipped = download_run(
        aws,
        bucket,
        prefix,
        objects,
        dest,
        lambda path, size: echo(f"  {path}  ({format_size(size)})"),
    )
    local = {download.key: download.path for download in downloads}
    summary_path = local.get(prefix + "summary.json")
    summary = None
    if summary_path is not None:
        try:
            loaded = json.loads(summary_path.read_text())
            summary = loaded if isinstance(loaded, dict) else {"summary": loaded}
        except ValueError:
            summary = None
    complete = [item for item in objects if item.key in local]
    plot, checkpoint = plot_object(complete, summary), newest_checkpoint(complete)
    paths = {
        "summary": summary_path,
        "plot": local[plot.key] if plot else None,
        "checkpoint": local[checkpoint.key] if checkpoint else None,
    }
    echo(format_results(downloads, skipped, summary, paths))
    return 0


@dataclass(frozen=True)
class RunRow:
    name: str
    complete: bool
    step: object
    loss: object
    date: datetime | None
    current: bool


def describe_run(aws: Aws, bucket: str, stack: str, name: str, current: str | None) -> RunRow:
    prefix = run_prefix(stack, name)
    objects = list_objects(aws, bucket, prefix)
    names = {item.key[len(prefix) :] for item in objects}
    summary = read_json(aws, bucket, prefix + "summary.json") if "summary.json" in names else None
    progress = read_json(aws, bucket, prefix + PROGRESS_FILE) if PROGRESS_FILE in names else None
    summary, progress = summary or {}, progress or {}
    step = summary.get("steps", progress.get("step"))
    loss = summary.get("final_loss", progress.get("loss"))
    return RunRow(
        name=name,
        complete=COMPLETE_MARKER in names,
        step=step,
        loss=loss,
        date=max((item.modified for item in objects), default=None),
        current=name == current,
    )


def format_runs(rows: Sequence[RunRow]) -> str:
    table = [
        [
            "*" if row.current else "",
            row.name,
            "complete" if row.complete else "in progress/stopped",
            format_number(row.step),
            format_number(row.loss),
            format_time(row.date),
        ]
        for row in rows
    ]
    return format_table(["", "run", "status", "last step", "final loss", "date"], table)


def run_runs(
    aws: Aws, stack: str, bucket: str, current: str | None, echo: Callable[[str], None]
) -> int:
    names = list_prefixes(aws, bucket, f"{stack}/")
    if not names:
        echo(f"no runs in s3://{bucket}/{stack}/")
        return 0
    rows = [describe_run(aws, bucket, stack, name, current) for name in names]
    # Newest first; S3's dates have whole seconds, so the name decides a tie.
    rows.sort(key=lambda row: (row.date or EPOCH, row.name), reverse=True)
    echo(format_runs(rows))
    if current:
        echo(f"(* the run stack {stack} trains now: {current})")
    return 0
