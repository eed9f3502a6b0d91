"""A run's state in S3, at s3://<bucket>/<stack>/<run>/: node 0 restores it before training
(so a cluster made again continues the run) and marks it complete when training has ended;
every node reads the script arguments the run was started with, when its deploy gives none."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError

from userdata.artifacts import in_upload_order, is_complete, split_s3_uri
from userdata.outputs import OUTPUTS
from userdata.run_layout import CHECKPOINT_STEP, COMPLETE_MARKER, RUN_ARGS_FILE, checkpoint_of

KEEP_CHECKPOINTS = 2  # the newest, and the one before in case the newest is torn


@dataclass(frozen=True)
class Restored:
    paths: list[Path]
    step: int | None  # of the newest checkpoint restored (step-N.ckpt), if any
    kept: int = 0  # files of a shared run directory that already held the run, left as they are

    @property
    def files(self) -> int:
        return len(self.paths)

    def describe(self) -> str:
        if self.kept:
            newest = f", newest checkpoint step {self.step}" if self.step is not None else ""
            return f"continued in the shared run directory ({self.kept} file(s){newest})"
        if self.step is not None:
            return f"resumed from step {self.step}"
        return f"restored {self.files} file(s)" if self.files else "new run"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _read_json(s3: Any, uri: str, name: str) -> dict[str, Any] | None:
    """A small JSON file of the run; None when there is none (or it is torn, or not ours)."""
    bucket, prefix = split_s3_uri(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=_key(prefix, name))["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        found = json.loads(body)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def completed(
    s3: Any, uri: str, fingerprint: str = "", script_args: list[str] | None = None
) -> dict[str, Any] | None:
    """The run's completion marker, if the run has ended well with what the nodes run now:
    a run named again with more epochs (other arguments) or new code (another fingerprint)
    goes on training."""
    marker = _read_json(s3, uri, COMPLETE_MARKER)
    if marker is None:
        return None
    if fingerprint and marker.get("fingerprint", fingerprint) != fingerprint:
        return None
    if script_args is not None and marker.get("script_args", script_args) != script_args:
        return None
    return marker


def mark_complete(
    s3: Any, uri: str, run: str, fingerprint: str = "", script_args: list[str] | None = None
) -> None:
    bucket, prefix = split_s3_uri(uri)
    marker = {"run": run, "status": "complete", "finished": datetime.now(UTC).isoformat()}
    marker["fingerprint"] = fingerprint
    marker["script_args"] = script_args or []
    s3.put_object(
        Bucket=bucket, Key=_key(prefix, COMPLETE_MARKER), Body=json.dumps(marker).encode()
    )


def recorded_args(s3: Any, uri: str) -> list[str] | None:
    """The script arguments the run was started or last continued with (None: not recorded)."""
    record = _read_json(s3, uri, RUN_ARGS_FILE)
    found = record.get("script_args") if record else None
    if isinstance(found, list) and all(isinstance(arg, str) for arg in found):
        return found
    return None


def record_args(s3: Any, uri: str, script_args: list[str]) -> None:
    bucket, prefix = split_s3_uri(uri)
    body = json.dumps({"script_args": script_args}).encode()
    s3.put_object(Bucket=bucket, Key=_key(prefix, RUN_ARGS_FILE), Body=body)


def restore(s3: Any, uri: str, run_dir: Path) -> Restored:
    """The run's complete files (no temporary or set-aside name) into an empty run_dir, of its
    checkpoints only the newest two (S3 keeps every one ever saved); each file lands under a
    temporary name first, so a restore cut short leaves nothing half-written. A run_dir that
    holds files already (the shared one, after a node's restart) is left as it is."""
    present = [path for path in run_dir.rglob("*") if path.is_file()]
    if present:  # a shared run directory this cluster wrote already: newer than S3's copy
        relatives = [
            PurePosixPath(path.relative_to(run_dir).as_posix())
            for path in present
            if is_complete(path)
        ]
        steps = checkpoint_steps(relatives)
        return Restored([], max(steps.values()) if steps else None, kept=len(present))
    bucket, prefix = split_s3_uri(uri)
    start = _key(prefix, "")
    listed: dict[str, str] = {}  # relative path -> key
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for item in page.get("Contents", []):
            relative = item["Key"][len(start) :]
            if relative in ("", COMPLETE_MARKER, RUN_ARGS_FILE):
                continue
            if relative.startswith(f"{OUTPUTS}/"):  # the working directory's: kept, not restored
                continue
            listed[relative] = item["Key"]
    # Complete files only; a sharded checkpoint only whole, its .metadata last.
    order = in_upload_order([PurePosixPath(r) for r in sorted(listed)])
    steps = checkpoint_steps(order)
    older = set(sorted(steps, key=steps.__getitem__)[:-KEEP_CHECKPOINTS])
    wanted = {
        relative.as_posix(): listed[relative.as_posix()]
        for relative in order
        if checkpoint_of(relative) not in older
    }
    paths = []
    for relative, key in wanted.items():
        target = run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        s3.download_file(bucket, key, str(partial))
        partial.replace(target)
        paths.append(target)
    return Restored(paths, max(steps.values()) if steps else None)


def checkpoint_steps(relatives: list[PurePosixPath]) -> dict[str, int]:
    """The run's checkpoints whose name says their step (step-N.ckpt, a file or a sharded
    folder), each with its step."""
    steps = {}
    for relative in relatives:
        name = checkpoint_of(relative)
        if name and (match := CHECKPOINT_STEP.search(name)):
            steps[name] = int(match.group(1))
    return steps
