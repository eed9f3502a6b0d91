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


def dcp_folder(folder: Path, step: int) -> None:
    """A checkpoint as Lightning's sharded save writes it: the shards and .metadata
    (torch.distributed.checkpoint), then meta.pt (rank 0)."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"weight": torch.full((2, 3), float(step))}, checkpoint_id=folder)
    torch.save({"step": step}, folder / "meta.pt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process
def test_a_sharded_folder_goes_up_only_with_every_shard_its_metadata_names(
    s3: Any, tmp_path: Path
) -> None:
    """On the shared file system node 0 may list a folder before it sees another node's shard:
    the .metadata says which shards there are, and the folder waits for all of them."""
    bucket = f"named-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints" / "step-00000010.ckpt"
    dcp_folder(folder, 10)
    shard = next(folder.glob("*.distcp"))
    shard.rename(tmp_path / shard.name)  # not seen here yet
    sync = ArtifactSync(s3, f"s3://{bucket}/run", run_dir)
    sync.sync_once()
    assert keys(s3, bucket) == set()
    (tmp_path / shard.name).rename(shard)
    sync.sync_once()
    names = {f"run/checkpoints/step-00000010.ckpt/{p.name}" for p in folder.iterdir()}
    assert keys(s3, bucket) == names and len(names) == 3


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_during_training_a_sharded_folder_goes_up_once_a_round_finds_it_unchanged(
    s3: Any, tmp_path: Path
) -> None:
    """Lightning writes meta.pt after .metadata: a round that finds a folder new or changed
    leaves it to the next one; at the end (the script has exited) it goes at once."""
    bucket = f"quiet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints" / "step-00000005.ckpt"
    dcp_folder(folder, 5)
    (folder / "meta.pt").unlink()  # rank 0 has not written it yet
    sync = ArtifactSync(s3, f"s3://{bucket}/run", run_dir)
    sync.sync_once(settled=False)
    assert keys(s3, bucket) == set()
    import torch

    torch.save({"step": 5}, folder / "meta.pt")
    sync.sync_once(settled=False)
    assert keys(s3, bucket) == set()  # changed since the round before
    sync.sync_once(settled=False)
    assert "run/checkpoints/step-00000005.ckpt/meta.pt" in keys(s3, bucket)
    later = run_dir / "checkpoints" / "step-00000010.ckpt"
    dcp_folder(later, 10)
    assert sync.stop() == 3  # the end: settled, the new folder's three files go up
    assert "run/checkpoints/step-00000010.ckpt/.metadata" in keys(s3, bucket)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_new_cluster_restores_the_newest_two_sharded_folders_whole(
    s3: Any, tmp_path: Path
) -> None:
    from userdata.run_state import KEEP_CHECKPOINTS, restore

    bucket = f"restore-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    run_dir = tmp_path / "run"
    for step in (5, 10, 15):
        dcp_folder(run_dir / "checkpoints" / f"step-{step:08d}.ckpt", step)
    ArtifactSync(s3, f"s3://{bucket}/run", run_dir).sync_once()
    new_cluster = tmp_path / "new-cluster" / "run"
    restored = restore(s3, f"s3://{bucket}/run", new_cluster)
    assert KEEP_CHECKPOINTS == 2
    assert restored.describe() == "resumed from step 15"
    assert sorted(p.name for p in (new_cluster / "checkpoints").iterdir()) == [
        "step-00000010.ckpt",
        "step-00000015.ckpt",
    ]
    for step in (10, 15):
        name = f"checkpoints/step-{step:08d}.ckpt"
        assert sorted(p.name for p in (new_cluster / name).iterdir()) == sorted(
            p.name for p in (run_dir / name).iterdir()
        )
