"""A run's state in S3, at s3://<bucket>/<stack>/<run>/: node 0 restores it before training
(so a cluster made again continues the run) and marks it complete when training has ended."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from userdata.artifacts import is_complete, split_s3_uri
from userdata.run_layout import CHECKPOINT_STEP, COMPLETE_MARKER

KEEP_CHECKPOINTS = 2  # the newest, and the one before in case the newest is torn


@dataclass(frozen=True)
class Restored:
    paths: list[Path]
    step: int | None  # of the newest checkpoint restored (step-N.ckpt), if any

    @property
    def files(self) -> int:
        return len(self.paths)

    def describe(self) -> str:
        if self.step is not None:
            return f"resumed from step {self.step}"
        return f"restored {self.files} file(s)" if self.files else "new run"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def completed(s3: Any, uri: str, fingerprint: str = "") -> dict[str, Any] | None:
    """The run's completion marker, if the run has ended well with what the nodes run now:
    a run named again with more epochs or new code (another fingerprint) goes on training."""
    bucket, prefix = split_s3_uri(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=_key(prefix, COMPLETE_MARKER))["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        marker: dict[str, Any] = json.loads(body)
    except ValueError:  # not ours, or torn: the run is not known to be complete
        return None
    if fingerprint and marker.get("fingerprint", fingerprint) != fingerprint:
        return None
    return marker


def mark_complete(s3: Any, uri: str, run: str, fingerprint: str = "") -> None:
    bucket, prefix = split_s3_uri(uri)
    marker = {"run": run, "status": "complete", "finished": datetime.now(UTC).isoformat()}
    marker["fingerprint"] = fingerprint
    s3.put_object(
        Bucket=bucket, Key=_key(prefix, COMPLETE_MARKER), Body=json.dumps(marker).encode()
    )


def restore(s3: Any, uri: str, run_dir: Path) -> Restored:
    """The run's complete files (no temporary or set-aside name) into run_dir, of its
    checkpoints only the newest two (S3 keeps every one ever saved); each file lands under a
    temporary name first, so a restore cut short leaves nothing half-written."""
    bucket, prefix = split_s3_uri(uri)
    start = _key(prefix, "")
    wanted: dict[str, str] = {}  # relative path -> key
    checkpoints: list[tuple[int, str]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for item in page.get("Contents", []):
            relative = item["Key"][len(start) :]
            if not relative or relative == COMPLETE_MARKER or not is_complete(run_dir / relative):
                continue
            wanted[relative] = item["Key"]
            if match := CHECKPOINT_STEP.search(relative):
                checkpoints.append((int(match.group(1)), relative))
    for _, old in sorted(checkpoints)[:-KEEP_CHECKPOINTS]:
        del wanted[old]
    paths = []
    for relative, key in sorted(wanted.items()):
        target = run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        s3.download_file(bucket, key, str(partial))
        partial.replace(target)
        paths.append(target)
    return Restored(paths, max(checkpoints)[0] if checkpoints else None)
