"""`results` (download one run's files and show its summary) and `runs` (the runs a stack
has made), both reading `s3://<bucket>/<stack>/<run>/`.

S3 egress is billed per GB and the run's folder keeps every checkpoint ever uploaded, so
`results` downloads by default the small files (everything that is not a checkpoint) and only
the newest checkpoint; `--all` downloads every one. It says how much it will download before
it starts, and asks first (on a terminal, without `--yes`) above CONFIRM_ABOVE bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from console import NO_VALUE, format_number, format_pairs, format_table, format_time
from console.aws import (
    Aws,
    ConsoleError,
    S3Object,
    explain,
    list_objects,
    list_prefixes,
    read_json,
)
from userdata.run_layout import COMPLETE_MARKER, PROGRESS_FILE, checkpoint_of

EPOCH = datetime.fromtimestamp(0, UTC)
CONFIRM_ABOVE = 1 << 30  # bytes: ask before downloading more (1 GiB)


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


@dataclass
class Selection:
    """What `results` downloads of a run's objects, and what it leaves out."""

    wanted: list[S3Object] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)  # keys never downloaded
    older: list[S3Object] = field(default_factory=list)  # older checkpoints' files (no --all)
    older_checkpoints: int = 0
    newest: str | None = None  # the newest checkpoint's path in the run


def newest_checkpoint(checkpoints: dict[str, list[S3Object]]) -> str | None:
    """The most recently uploaded checkpoint (its newest file); the name decides a tie, and
    the trainer's step-%08d names sort by step."""
    return max(
        checkpoints,
        key=lambda name: (max(item.modified for item in checkpoints[name]), name),
        default=None,
    )


def select(objects: Sequence[S3Object], prefix: str, everything: bool) -> Selection:
    selection = Selection()
    checkpoints: dict[str, list[S3Object]] = {}
    for item in objects:
        relative = relative_path(item.key, prefix)
        if relative is None:
            continue
        if is_temporary(item.key):
            selection.temporary.append(item.key)
            continue
        checkpoint = checkpoint_of(relative)
        if checkpoint is None:
            selection.wanted.append(item)
        else:
            checkpoints.setdefault(checkpoint, []).append(item)
    selection.newest = newest_checkpoint(checkpoints)
    for name, items in checkpoints.items():
        if everything or name == selection.newest:
            selection.wanted.extend(items)
        else:
            selection.older.extend(items)
            selection.older_checkpoints += 1
    return selection


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


def local_path(dest: Path, prefix: str, item: S3Object) -> Path:
    relative = relative_path(item.key, prefix)
    assert relative is not None  # select() keeps only keys inside the run
    return dest.joinpath(*relative.parts)


def download_run(
    aws: Aws,
    bucket: str,
    prefix: str,
    objects: Sequence[S3Object],
    dest: Path,
    fetching: Callable[[PurePosixPath, int], None] = lambda path, size: None,
) -> list[Download]:
    """Downloads into a temporary name and renames, so an interrupted download never leaves
    a file that looks complete; a file already here (same size and time) is not fetched.
    A failed download is one line (ConsoleError): the files already here stay."""
    s3 = aws.client("s3")
    downloads = []
    for item in objects:
        path = local_path(dest, prefix, item)
        if _unchanged(path, item):
            downloads.append(Download(item.key, path, item.size, fetched=False))
            continue
        fetching(path.relative_to(dest), item.size)  # before: a checkpoint can take a while
        partial = path.with_name(path.name + ".download")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item.key, str(partial))
            stamp = item.modified.timestamp()
            os.utime(partial, (stamp, stamp))
            partial.replace(path)
        except BaseException as error:  # Ctrl-C, AWS, the disk: no half file left behind
            partial.unlink(missing_ok=True)
            if isinstance(error, OSError):
                raise ConsoleError(f"cannot write {path}: {error.strerror or error}") from error
            if isinstance(error, Boto3Error | BotoCoreError | ClientError):
                raise ConsoleError(
                    f"could not download s3://{bucket}/{item.key}: {explain(error)} (run it "
                    "again: the files already downloaded are not fetched again)"
                ) from error
            raise
        downloads.append(Download(item.key, path, item.size, fetched=True))
    return downloads


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def format_plan(to_fetch: Sequence[S3Object], selection: Selection) -> str:
    """What a download will cost, said before it starts."""
    size = sum(item.size for item in to_fetch)
    text = f"{len(to_fetch)} file(s) to download, {format_size(size)}"
    here = len(selection.wanted) - len(to_fetch)
    if here:
        text += f" ({here} already here)"
    if selection.older_checkpoints:
        left_out = format_size(sum(item.size for item in selection.older))
        text += (
            f"; {selection.older_checkpoints} older checkpoint(s), {left_out}, not downloaded "
            "(--all downloads them)"
        )
    return text


def format_results(
    downloads: Sequence[Download],
    selection: Selection,
    summary: dict[str, Any] | None,
    paths: dict[str, Path | None],
) -> str:
    fetched = sum(download.fetched for download in downloads)
    counts = (
        f"{fetched} file(s) downloaded, {len(downloads) - fetched} already here, "
        f"{len(selection.temporary)} temporary skipped"
    )
    if selection.older_checkpoints:
        counts += f", {selection.older_checkpoints} older checkpoint(s) not downloaded (--all)"
    lines = [counts]
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
    everything: bool = False,
    confirm: Callable[[str], bool] | None = None,
) -> int:
    """confirm: asks the user before a download over CONFIRM_ABOVE bytes (None: no one to
    ask, or --yes); declined, nothing is downloaded and the exit status is 1."""
    prefix = run_prefix(stack, run)
    objects = list_objects(aws, bucket, prefix)
    if not objects:
        raise no_run_error(run, bucket, stack, list_prefixes(aws, bucket, f"{stack}/"))
    dest = dest_root / stack / run
    selection = select(objects, prefix, everything)
    to_fetch = [
        item for item in selection.wanted if not _unchanged(local_path(dest, prefix, item), item)
    ]
    echo(f"s3://{bucket}/{prefix} -> {dest}/")
    echo(format_plan(to_fetch, selection))
    size = sum(item.size for item in to_fetch)
    if size > CONFIRM_ABOVE and confirm is not None:
        if not confirm(f"Download {format_size(size)}?"):
            echo("nothing downloaded")
            return 1
    downloads = download_run(
        aws,
        bucket,
        prefix,
        selection.wanted,
        dest,
        lambda path, size: echo(f"  {path.as_posix()}  ({format_size(size)})"),
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
    plot = plot_object(complete, summary)
    newest = selection.newest
    paths = {
        "summary": summary_path,
        "plot": local[plot.key] if plot else None,
        "checkpoint": dest.joinpath(*newest.split("/")) if newest else None,
    }
    echo(format_results(downloads, selection, summary, paths))
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
