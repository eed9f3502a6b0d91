"""Copies the run directory (checkpoints, metrics, plots) to the artifacts bucket, from rank 0."""

from __future__ import annotations

import os
import pickle
import pickletools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import CancelledError
from s3transfer.futures import TransferFuture
from s3transfer.manager import TransferManager

from userdata.run_layout import CHECKPOINT_STEP, PROGRESS_FILE, checkpoint_of


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def is_complete(path: Path) -> bool:
    """Files being written carry a temporary name until they are renamed into place; a torn
    checkpoint set aside at resume (`.unreadable`) is never worth uploading."""
    name = path.name
    return not (
        name.startswith(".") or ".tmp" in name or name.endswith((".partial", ".unreadable"))
    )


# torch.distributed.checkpoint (and Lightning's sharded checkpoints on top of it): every rank
# writes its shards (__<rank>_<n>.distcp) into one folder, then the coordinator writes the
# folder's .metadata, which names every shard file, after all of them (Lightning's meta.pt, from
# rank 0, comes just after). A folder without it is not a checkpoint yet.
SHARD_SUFFIX = ".distcp"
SHARDED_MARKER = ".metadata"


def shards_named(metadata: bytes) -> set[str] | None:
    """The shard files a .metadata names; None when it cannot be read. Read with pickletools,
    which parses the pickle without running any of it (and needs no torch)."""
    try:
        return {
            argument
            for _, argument, _ in pickletools.genops(metadata)
            if isinstance(argument, str) and argument.endswith(SHARD_SUFFIX)
        }
    except (ValueError, EOFError, pickle.UnpicklingError):
        return None


def in_upload_order(
    relatives: list[PurePosixPath], whole: Callable[[PurePosixPath], bool] | None = None
) -> list[PurePosixPath]:
    """The complete files of a run, in an order that leaves S3 readable at every moment: a
    sharded checkpoint's files only once its .metadata is written (and `whole` says the
    folder is: every shard it names is there, nothing is still being added), and that
    .metadata after them (a reader that finds it finds every shard)."""
    present = set(relatives)
    sharded = {
        relative.parent
        for relative in relatives
        if relative.suffix == SHARD_SUFFIX or relative.name == SHARDED_MARKER
    }
    ready = {
        folder
        for folder in sharded
        if folder / SHARDED_MARKER in present and (whole is None or whole(folder))
    }
    files, markers = [], []
    for relative in relatives:
        if relative.parent not in sharded:
            if is_complete(Path(relative.name)):
                files.append(relative)
        elif relative.parent not in ready:
            continue  # its ranks are still writing it
        elif relative.name == SHARDED_MARKER:
            markers.append(relative)
        elif is_complete(Path(relative.name)):
            files.append(relative)
    return files + markers


def fresh_stat(path: Path) -> os.stat_result:
    """A file's size and time as the file system has them now: on NFS (the shared run
    directory) a plain stat may answer from the client's attribute cache, up to a minute old,
    while opening a file checks with the server (close-to-open consistency)."""
    with path.open("rb") as opened:
        return os.fstat(opened.fileno())


def recency(name: str, files: list[Path]) -> tuple[int, float]:
    """How new a checkpoint is: its step where its name says it (step-N.ckpt), else when its
    files were last written."""
    match = CHECKPOINT_STEP.search(name)
    written = max((path.stat().st_mtime for path in files), default=0.0)
    return (int(match.group(1)) if match else -1, written)


class ArtifactSync:
    """Uploads new or changed complete files; an S3 object appears only once fully uploaded."""

    def __init__(
        self,
        s3: Any,
        uri: str,
        run_dir: Path,
        interval: float = 60.0,
        progress_interval: float | None = None,
        files: Callable[[], list[Path]] | None = None,
    ) -> None:
        """progress_interval: how often the script's small progress.json goes up on its own
        (what `make status` shows), between the full syncs. files: which files of run_dir to
        keep in sync (default: every complete one)."""
        self.files = files
        self.s3 = s3
        self.bucket, self.prefix = split_s3_uri(uri)
        self.run_dir = run_dir
        self.interval = interval
        self.progress_interval = progress_interval or interval
        self._seen: dict[Path, tuple[int, int]] = {}
        # A sharded folder as the last round saw it: uploaded once a round finds it unchanged.
        self._folders: dict[PurePosixPath, tuple[tuple[str, int, int], ...]] = {}
        self._stop = threading.Event()
        self._cancel = threading.Event()  # the sync gives way to the newest checkpoint
        self._thread: threading.Thread | None = None
        # s3transfer, as upload_file uses it, but with the future at hand: a cancelled upload
        # stops at once and its multipart upload is aborted (an exception raised from a
        # progress callback would be retried by botocore, attempt after attempt).
        self._transfers = TransferManager(s3)
        self._in_flight: TransferFuture | None = None
        self._lock = threading.Lock()

    def _key(self, path: Path) -> str:
        relative = path.relative_to(self.run_dir).as_posix()
        return "/".join(part for part in (self.prefix, relative) if part)

    def upload(self, path: Path) -> str | None:
        """Uploads one file unless S3 has it as it is now; the error, or None."""
        try:
            stat = fresh_stat(path)  # and s3transfer, which sizes the upload, sees it fresh
        except FileNotFoundError:  # replaced between listing and upload
            return None
        signature = (stat.st_size, stat.st_mtime_ns)
        if self._seen.get(path) == signature:
            return None
        future = self._transfers.upload(str(path), self.bucket, self._key(path))
        with self._lock:
            self._in_flight = future
            if self._cancel.is_set() and threading.current_thread() is self._thread:
                future.cancel()  # stop_now came between the submission and this line
        try:
            future.result()
        except FileNotFoundError:
            return None
        except CancelledError:
            return "given up for the newest checkpoint"
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as error:
            # The sync thread must never die of one upload: the next round tries again.
            return f"{type(error).__name__}: {error}"
        finally:
            with self._lock:
                self._in_flight = None
        self._seen[path] = signature
        return None

    def _cancel_in_flight(self) -> None:
        with self._lock:
            if self._in_flight is not None:
                self._in_flight.cancel()

    def complete_files(self, settled: bool = True) -> list[Path]:
        """settled: nothing writes in the run directory any more (the script has ended);
        during training a sharded folder must also be unchanged since the round before
        (Lightning's meta.pt comes after .metadata; another node's shards through NFS)."""
        if not self.run_dir.is_dir():
            return []
        if self.files is not None:
            return [path for path in self.files() if is_complete(path)]
        relatives = [
            PurePosixPath(path.relative_to(self.run_dir).as_posix())
            for path in sorted(self.run_dir.rglob("*"))
            if path.is_file()
        ]
        folders = dict(self._folders)
        self._folders = {}

        def whole(folder: PurePosixPath) -> bool:
            path = self.run_dir / folder
            try:
                named = shards_named((path / SHARDED_MARKER).read_bytes())
                listing = tuple(
                    (each.name, (stat := fresh_stat(each)).st_size, stat.st_mtime_ns)
                    for each in sorted(path.iterdir())
                )
            except OSError:
                return False
            self._folders[folder] = listing
            names = {name for name, _, _ in listing}
            if named is None or not named <= names:
                return False  # a torn .metadata, or shards not (yet) seen
            return settled or folders.get(folder) == listing

        return [self.run_dir / relative for relative in in_upload_order(relatives, whole)]

    def sync_once(self, only: str | None = None, settled: bool = True) -> int:
        """Uploads what changed (only: just the file of that name at the run dir's top;
        settled: see complete_files)."""
        uploaded = 0
        paths = [self.run_dir / only] if only else self.complete_files(settled)
        for path in paths:
            if not path.is_file() or (only and not is_complete(path)) or self._cancel.is_set():
                continue
            before = self._seen.get(path)
            error = self.upload(path)
            if error:
                # Next round tries again.
                print(f"[fabric-agent] artifact upload of {path} failed: {error}", file=sys.stderr)
            elif self._seen.get(path) != before:
                uploaded += 1
        return uploaded

    def stop_now(self) -> str:
        """On a stop (spot notice, a stop anywhere in the cluster): the upload in flight gives
        way, the newest checkpoint goes first, superseded checkpoints are skipped, then the
        small files. Says whether the newest checkpoint is in S3."""
        started = time.monotonic()
        self._cancel.set()
        self._stop.set()
        self._cancel_in_flight()
        if self._thread:
            self._thread.join()
        self._cancel.clear()
        checkpoints: dict[str, list[Path]] = {}  # a checkpoint (file or folder) -> its files
        others = []
        for path in self.complete_files():
            relative = PurePosixPath(path.relative_to(self.run_dir).as_posix())
            name = checkpoint_of(relative)
            if name is None:
                others.append(path)
            else:
                checkpoints.setdefault(name, []).append(path)
        newest = max(checkpoints, key=lambda name: recency(name, checkpoints[name]), default=None)
        errors = [
            error for path in checkpoints.get(newest or "", []) if (error := self.upload(path))
        ]
        for path in others:
            self.upload(path)
        self._transfers.shutdown()
        if newest is None:
            return "no checkpoint to upload"
        if errors:
            return f"newest checkpoint {newest} NOT in S3 ({errors[0]})"
        return f"newest checkpoint {newest} in S3 ({time.monotonic() - started:.1f} s)"

    def mark_seen(self, paths: list[Path]) -> None:
        """Files already in S3 as they are here (restored): not uploaded again."""
        for path in paths:
            stat = path.stat()
            self._seen[path] = (stat.st_size, stat.st_mtime_ns)

    def _loop(self) -> None:
        since_full = 0.0
        step = min(self.interval, self.progress_interval)
        while not self._stop.wait(step):
            since_full += step
            if since_full >= self.interval:
                since_full = 0.0
                self.sync_once(settled=False)
            else:
                self.sync_once(only=PROGRESS_FILE)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="artifact-sync", daemon=True)
        self._thread.start()

    def abandon(self) -> None:
        """Stops syncing and uploads nothing more (another cluster owns the run now)."""
        self._cancel.set()
        self._stop.set()
        self._cancel_in_flight()
        if self._thread:
            self._thread.join()
        self._transfers.shutdown()

    def stop(self) -> int:
        """Stops the periodic sync and uploads what is left; returns the files uploaded last."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        uploaded = self.sync_once()
        self._transfers.shutdown()
        return uploaded
