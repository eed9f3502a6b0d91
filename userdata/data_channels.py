"""The data channels copied to this node's own disk before training: every object under each
channel's prefix, in parallel, to <data dir>/<channel>/<key below the prefix>.

Resumable: a manifest beside the channels records each copied object's size and ETag, so a
restart or a second boot (user data runs once; the agent at every start) copies only what is
missing or changed. A file is renamed into place only once whole (its listed size); an object
replaced while it was copied has another ETag at the next listing, and is copied again. Objects
gone from the prefix are removed from the copy. Progress goes to the phase (`data: 3.2 of 10.0
GB`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from userdata.aws_clients import aws_client
from userdata.errors import AgentError
from userdata.run_inputs import DataChannel, RunInputs

MANIFEST = ".fabric-data.json"  # in the data dir: {channel: {relative path: [size, etag]}}
WORKERS = 16  # objects at once; S3 advises one request per 85-90 MB/s wanted
# Large objects in 16 MB parts, four at a time (S3's advice: 8-16 MB ranges).
TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024**2, multipart_chunksize=16 * 1024**2, max_concurrency=4
)
CONNECTIONS = WORKERS * TRANSFER.max_request_concurrency  # of the client the copy shares
RESERVE_BYTES = 1024**3  # left free on the volume for logs, checkpoints and caches
# Seconds between progress phases: PutParameter is a few calls a second for the whole account.
REPORT_EVERY = 30.0
SAVE_EVERY = 5.0  # seconds between manifest writes: a crash copies at most that much again
GB = 1e9
PARTIAL_DIR = ".partial"
DATA_DIR = "/opt/fabric/data"  # on a node's own disk; boot.sh passes $FABRIC_HOME/data
STOP_EVERY = 5.0  # seconds between looks at whether to stop


@dataclass(frozen=True)
class S3Object:
    channel: str
    key: str
    relative: str  # below the prefix
    size: int
    etag: str


def gigabytes(size: int) -> str:
    return f"{size / GB:.1f} GB"


def _reason(error: ClientError | BotoCoreError) -> str:
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        return {
            "NoSuchBucket": "the bucket does not exist",
            "AccessDenied": "access denied (the node role reads only the channel's prefix; "
            "a KMS-encrypted bucket's key must allow the role)",
            "PreconditionFailed": "it changed while it was copied",
        }.get(code, f"{code or 'error'}: {error}")
    return str(error)


def list_channel(s3: Any, channel: DataChannel) -> list[S3Object]:
    """Every object under the prefix (folder markers aside); one line naming the channel when
    the bucket cannot be listed or holds nothing there."""
    found = []
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=channel.bucket, Prefix=channel.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                relative = item["Key"][len(channel.prefix) :]
                if not relative or relative.endswith("/"):
                    continue
                if relative.startswith("/") or ".." in relative.split("/"):
                    raise AgentError(
                        f"data channel {channel.name}: the key {item['Key']!r} would be "
                        "written outside the channel's folder"
                    )
                found.append(
                    S3Object(channel.name, item["Key"], relative, item["Size"], item["ETag"])
                )
    except (ClientError, BotoCoreError) as error:
        raise AgentError(
            f"data channel {channel.name}: cannot list {channel.uri}: {_reason(error)}"
        ) from None
    if not found:
        raise AgentError(f"data channel {channel.name}: no objects under {channel.uri}")
    _refuse_file_and_folder(channel, found)
    return found


def _refuse_file_and_folder(channel: DataChannel, found: list[S3Object]) -> None:
    """S3 may hold both `a` and `a/b`; a disk cannot: one line before any byte is copied."""
    files = {item.relative for item in found}
    for item in found:
        parts = item.relative.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in files:
                raise AgentError(
                    f"data channel {channel.name}: {channel.uri}{folder} is an object and "
                    f"also the folder of {channel.uri}{item.relative}; a disk holds one of them"
                )


class Manifest:
    """What this node copied: key -> (size, etag) per channel, written atomically."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / MANIFEST
        self.lock = threading.Lock()
        try:
            self.entries: dict[str, dict[str, list[Any]]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def holds(self, item: S3Object, target: Path) -> bool:
        recorded = self.entries.get(item.channel, {}).get(item.relative)
        return (
            recorded == [item.size, item.etag]
            and target.is_file()
            and target.stat().st_size == item.size
        )

    def record(self, item: S3Object) -> None:
        with self.lock:
            self.entries.setdefault(item.channel, {})[item.relative] = [item.size, item.etag]

    def forget(self, channel: str, relative: str) -> None:
        with self.lock:
            self.entries.get(channel, {}).pop(relative, None)

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.entries)
        partial = self.path.with_suffix(".part")
        partial.write_text(text)
        os.replace(partial, self.path)


class Progress:
    """Bytes in place (skipped ones included) of the total, reported at most every few seconds."""

    def __init__(self, total: int, report: Callable[[str], None]) -> None:
        self.total = total
        self.done = 0
        self.report = report
        self.lock = threading.Lock()
        self.last = time.monotonic()  # the first and last are said anyway

    def add(self, size: int) -> None:
        with self.lock:
            self.done += size
            now = time.monotonic()
            due = now - self.last >= REPORT_EVERY
            if due:
                self.last = now
        if due:
            self.say()

    def say(self) -> None:
        self.report(f"data: {self.done / GB:.1f} of {gigabytes(self.total)}")


def channel_dir(data_dir: Path, channel: str) -> Path:
    return data_dir / channel


def check_room(data_dir: Path, missing: int) -> None:
    free = shutil.disk_usage(data_dir).free
    if missing > free - RESERVE_BYTES:
        raise AgentError(
            f"data: {gigabytes(missing)} to copy, but the volume has {gigabytes(free)} free "
            f"(and keeps {gigabytes(RESERVE_BYTES)} for the run): raise volume_gb"
        )


class CopyStopped(Exception):
    """The copy stopped before its end: a stop of the cluster, or of this node, meanwhile."""


def _fetch(s3: Any, item: S3Object, bucket: str, partial: Path, progress: Progress) -> None:
    """A small object in one GET, pinned to the listed ETag (IfMatch: no mix of two
    versions); a large one in ranges, several at once (s3transfer)."""
    if item.size >= TRANSFER.multipart_threshold:
        s3.download_file(bucket, item.key, str(partial), Callback=progress.add, Config=TRANSFER)
        return
    body = s3.get_object(Bucket=bucket, Key=item.key, IfMatch=item.etag)["Body"]
    with partial.open("wb") as out:
        while chunk := body.read(1024**2):
            out.write(chunk)
            progress.add(len(chunk))


def _download(
    s3: Any, item: S3Object, bucket: str, target: Path, partial: Path, progress: Progress
) -> None:
    """One object to a temporary name (in the data dir's .partial/, wiped at each start),
    renamed into place once whole; one line naming the channel and the object when it cannot
    be (S3, or this disk: full, a key that is also another key's folder, a name too long)."""
    source = f"s3://{bucket}/{item.key}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _fetch(s3, item, bucket, partial, progress)
        size = partial.stat().st_size
        if size != item.size:
            raise AgentError(
                f"data channel {item.channel}: {source} came as {size} bytes, not {item.size}"
            )
        os.replace(partial, target)
    except (ClientError, BotoCoreError) as error:
        raise AgentError(
            f"data channel {item.channel}: cannot copy {source}: {_reason(error)}"
        ) from None
    except OSError as error:
        raise AgentError(
            f"data channel {item.channel}: cannot write {source} to {target}: "
            f"{error.strerror or error}"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def remove_stale(data_dir: Path, manifest: Manifest, listed: dict[str, list[S3Object]]) -> None:
    """What this node copied before and S3 no longer holds (or a channel no longer set)."""
    for channel in list(manifest.entries):
        if channel not in listed:
            shutil.rmtree(channel_dir(data_dir, channel), ignore_errors=True)
            del manifest.entries[channel]
            continue
        current = {item.relative for item in listed[channel]}
        for relative in [r for r in manifest.entries[channel] if r not in current]:
            (channel_dir(data_dir, channel) / relative).unlink(missing_ok=True)
            manifest.forget(channel, relative)


@dataclass(frozen=True)
class CopyResult:
    total: int  # bytes of every channel
    copied: int  # bytes downloaded now
    files: int
    files_copied: int
    seconds: float

    def describe(self) -> str:
        return (
            f"{self.files} file(s), {gigabytes(self.total)}: copied {self.files_copied} "
            f"({gigabytes(self.copied)}) in {self.seconds:.1f} s, "
            f"{self.files - self.files_copied} already here"
        )


def copy_channels(
    s3: Any,
    channels: tuple[DataChannel, ...],
    data_dir: Path,
    report: Callable[[str], None],
    workers: int = WORKERS,
    stop: Callable[[], str | None] = lambda: None,
) -> CopyResult:
    """stop: why to stop now (a stop of the cluster or of this node), looked at every few
    seconds; CopyStopped then, with what is whole kept for the next start."""
    started = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    listed = {channel.name: list_channel(s3, channel) for channel in channels}
    buckets = {channel.name: channel.bucket for channel in channels}
    manifest = Manifest(data_dir)
    remove_stale(data_dir, manifest, listed)
    todo, total, have = [], 0, 0
    for channel, items in listed.items():
        for item in items:
            total += item.size
            target = channel_dir(data_dir, channel) / item.relative
            if manifest.holds(item, target):
                have += item.size
            else:
                manifest.forget(item.channel, item.relative)
                todo.append((item, target))
    manifest.save()
    check_room(data_dir, sum(item.size for item, _ in todo))
    progress = Progress(total, report)
    progress.done = have
    progress.say()
    partials = data_dir / PARTIAL_DIR  # what a killed copy left: never taken for data
    shutil.rmtree(partials, ignore_errors=True)
    partials.mkdir()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data")
    futures = {
        pool.submit(
            _download, s3, item, buckets[item.channel], target, partials / str(index), progress
        ): item
        for index, (item, target) in enumerate(todo)
    }
    saved = time.monotonic()
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=STOP_EVERY, return_when=FIRST_COMPLETED)
            for future in done:  # every whole one recorded before a failure is raised
                if future.exception() is None:
                    manifest.record(futures[future])
            for future in done:
                future.result()
            if time.monotonic() - saved >= SAVE_EVERY:
                manifest.save()
                saved = time.monotonic()
            reason = stop()
            if reason and pending:
                raise CopyStopped(reason)
    finally:
        # On a failure or a stop, what is under way ends on its own; nothing more starts.
        pool.shutdown(wait=not pending, cancel_futures=True)
        manifest.save()
        if not pending:
            shutil.rmtree(partials, ignore_errors=True)
    progress.say()
    return CopyResult(
        total=total,
        copied=sum(item.size for item, _ in todo),
        files=sum(len(items) for items in listed.values()),
        files_copied=len(todo),
        seconds=time.monotonic() - started,
    )


def data_dir_variable(data_dir: Path, channels: tuple[DataChannel, ...]) -> str:
    """$FABRIC_DATA_DIR: one folder per channel, or with a single channel that channel's own."""
    if len(channels) == 1:
        return str(channel_dir(data_dir, channels[0].name))
    return str(data_dir)


def main(argv: list[str] | None = None) -> int:
    """The agent's data step alone, as it runs at each start of the agent (on a node: after a
    change of the data in S3, or to see what a start would copy)."""
    parser = argparse.ArgumentParser(
        prog="python -m userdata.data_channels", description=main.__doc__
    )
    parser.add_argument("--inputs", default="/opt/fabric/payload/inputs.json")
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", ""))
    args = parser.parse_args(argv)
    channels = RunInputs.read(args.inputs).data
    if not channels:
        print(f"no data channels in {args.inputs}")
        return 0
    s3 = aws_client("s3", args.region, 30.0, CONNECTIONS)
    try:
        result = copy_channels(s3, channels, Path(args.data_dir), print)
    except AgentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
