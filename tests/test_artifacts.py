"""The run's uploads on a stop (a spot notice anywhere): two minutes, so the newest checkpoint
goes first, the upload in flight gives way, superseded checkpoints are skipped."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from userdata.artifacts import ArtifactSync

BIG = 64 * 1024 * 1024  # an older checkpoint, mid-upload when the notice comes


def keys(s3: Any, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_on_a_stop_the_newest_checkpoint_goes_first_and_the_rest_give_way(
    s3: Any, tmp_path: Path
) -> None:
    bucket = f"stop-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000100.ckpt").write_bytes(os.urandom(BIG))
    (run_dir / "checkpoints" / "step-00000200.ckpt").write_bytes(b"200")
    (run_dir / "checkpoints" / "step-00000300.ckpt").write_bytes(b"300")
    (run_dir / "summary.json").write_text("{}")
    sync = ArtifactSync(s3, f"s3://{bucket}/run", run_dir, interval=0.01)
    sync.start()
    deadline = time.monotonic() + 30
    while sync._in_flight is None and time.monotonic() < deadline:  # step-100 on its way
        time.sleep(0.01)
    assert sync._in_flight is not None
    started = time.monotonic()
    said = sync.stop_now()
    took = time.monotonic() - started
    assert said.startswith("newest checkpoint checkpoints/step-00000300.ckpt in S3 ("), said
    assert keys(s3, bucket) == {"run/checkpoints/step-00000300.ckpt", "run/summary.json"}
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted, not left
    assert took < 10, f"{took:.1f} s: the upload in flight did not give way"


def test_a_newest_checkpoint_that_cannot_be_uploaded_is_said(s3: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000001.ckpt").write_bytes(b"1")
    sync = ArtifactSync(s3, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", run_dir)
    said = sync.stop_now()
    assert said.startswith("newest checkpoint checkpoints/step-00000001.ckpt NOT in S3 ("), said


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process
def test_a_sharded_checkpoint_reaches_s3_whole_and_comes_back_whole(
    s3: Any, tmp_path: Path
) -> None:
    """torch.distributed.checkpoint writes every rank's shards, then .metadata: S3 gets a
    folder only once its .metadata is written, and that last; a new cluster restores whole
    folders only, and the checkpoint loads."""
    import torch
    import torch.distributed.checkpoint as dcp

    from userdata.run_state import restore

    bucket = f"dcp-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    run_dir = tmp_path / "run"
    saved = {"weight": torch.arange(6.0).reshape(2, 3)}
    dcp.save(saved, checkpoint_id=run_dir / "checkpoints" / "sharded-8")
    dcp.save(saved, checkpoint_id=run_dir / "checkpoints" / "sharded-9")
    (run_dir / "checkpoints" / "sharded-9" / ".metadata").unlink()  # its ranks still writing
    sync = ArtifactSync(s3, f"s3://{bucket}/run", run_dir)
    order: list[str] = []
    upload = sync.upload
    sync.upload = lambda path: order.append(path.name) or upload(path)  # type: ignore[method-assign]
    sync.sync_once()
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "sharded-8").iterdir())
    assert ".metadata" in shards and any(name.endswith(".distcp") for name in shards)
    assert keys(s3, bucket) == {f"run/checkpoints/sharded-8/{name}" for name in shards}
    assert order[-1] == ".metadata"  # a reader that finds it finds every shard

    new_cluster = tmp_path / "new-cluster" / "run"
    restore(s3, f"s3://{bucket}/run", new_cluster)
    loaded = {"weight": torch.zeros(2, 3)}
    dcp.load(loaded, checkpoint_id=new_cluster / "checkpoints" / "sharded-8")
    assert torch.equal(loaded["weight"], saved["weight"])
    assert not (new_cluster / "checkpoints" / "sharded-9").exists()
