"""The data channels on a node's own disk (userdata/data_channels.py), against the emulated S3:
whole files in parallel, a second copy copies nothing, a change or a loss copies only what it
touched, and each bad case is one line naming the channel."""

from __future__ import annotations

import hashlib
import os
from collections import namedtuple
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from userdata import data_channels
from userdata.data_channels import MANIFEST, copy_channels, data_dir_variable
from userdata.errors import AgentError
from userdata.run_inputs import DataChannel

BUCKET = "datasets-test"
TRAIN = DataChannel("train", BUCKET, "mnist/train/")
EVAL = DataChannel("eval", BUCKET, "mnist/eval/")
# Small parts, so that a test's object is a multipart one (its ETag is not an MD5).
SMALL_PARTS = TransferConfig(multipart_threshold=5 * 1024**2, multipart_chunksize=5 * 1024**2)


@pytest.fixture
def bucket(s3) -> dict[str, bytes]:
    """A few objects per channel, one of them multipart; a folder marker; an object beside."""
    s3.create_bucket(Bucket=BUCKET)
    objects = {
        "mnist/train/part-0.bin": os.urandom(1000),
        "mnist/train/sub/part-1.bin": os.urandom(2000),
        "mnist/eval/labels.txt": b"0 1 2\n",
        "mnist/other/not-a-channel.bin": b"x",
    }
    for key, body in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    s3.put_object(Bucket=BUCKET, Key="mnist/train/empty-folder/", Body=b"")
    big = os.urandom(11 * 1024**2)
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"big-{os.getpid()}.bin"
    local.write_bytes(big)
    try:
        s3.upload_file(str(local), BUCKET, "mnist/train/big.bin", Config=SMALL_PARTS)
    finally:
        local.unlink()
    objects["mnist/train/big.bin"] = big
    yield objects
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_object_of_each_channel_is_copied_whole(s3, bucket, tmp_path: Path) -> None:
    phases: list[str] = []
    result = copy_channels(s3, (TRAIN, EVAL), tmp_path, phases.append)
    for key, body in bucket.items():
        if key.startswith("mnist/other/"):
            continue
        channel = "train" if key.startswith("mnist/train/") else "eval"
        relative = key.removeprefix(f"mnist/{channel}/")
        assert (tmp_path / channel / relative).read_bytes() == body
    assert not (tmp_path / "train" / "empty-folder").exists()
    assert not (tmp_path / data_channels.PARTIAL_DIR).exists()
    assert "-" in s3.head_object(Bucket=BUCKET, Key="mnist/train/big.bin")["ETag"]  # multipart
    total = sum(len(b) for k, b in bucket.items() if not k.startswith("mnist/other/"))
    assert (result.files, result.files_copied, result.total, result.copied) == (4, 4, total, total)
    assert phases[0] == "data: 0.0 of 0.0 GB"
    assert phases[-1] == f"data: {total / 1e9:.1f} of {total / 1e9:.1f} GB"


def test_a_second_copy_copies_nothing_and_a_change_only_what_changed(
    s3, bucket, tmp_path: Path
) -> None:
    copy_channels(s3, (TRAIN, EVAL), tmp_path, lambda _: None)
    before = {path: digest(path) for path in tmp_path.rglob("*.bin")}
    again = copy_channels(s3, (TRAIN, EVAL), tmp_path, lambda _: None)
    assert (again.files_copied, again.copied) == (0, 0)
    assert {path: digest(path) for path in tmp_path.rglob("*.bin")} == before
    # Same size, new content (a new ETag); one object gone; a local file cut short.
    s3.put_object(Bucket=BUCKET, Key="mnist/train/part-0.bin", Body=b"y" * 1000)
    s3.delete_object(Bucket=BUCKET, Key="mnist/train/sub/part-1.bin")
    with (tmp_path / "eval" / "labels.txt").open("r+b") as cut:
        cut.truncate(2)
    third = copy_channels(s3, (TRAIN, EVAL), tmp_path, lambda _: None)
    assert third.files_copied == 2  # the changed object and the cut file, nothing else
    assert (tmp_path / "train" / "part-0.bin").read_bytes() == b"y" * 1000
    assert not (tmp_path / "train" / "sub" / "part-1.bin").exists()
    assert (tmp_path / "eval" / "labels.txt").read_bytes() == b"0 1 2\n"


def test_an_interrupted_copy_goes_on_from_what_is_whole(
    s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = data_channels._download

    def fails_on_the_last(s3, item, *args) -> None:
        if item.relative == "sub/part-1.bin":
            raise AgentError("the node went down")
        real(s3, item, *args)

    monkeypatch.setattr(data_channels, "_download", fails_on_the_last)
    with pytest.raises(AgentError):
        copy_channels(s3, (TRAIN,), tmp_path, lambda _: None, workers=1)
    assert (tmp_path / MANIFEST).is_file()
    monkeypatch.setattr(data_channels, "_download", real)
    resumed = copy_channels(s3, (TRAIN,), tmp_path, lambda _: None)
    assert resumed.files_copied == 1 and resumed.copied == 2000  # big.bin and part-0 were whole
    for key in ("big.bin", "part-0.bin", "sub/part-1.bin"):
        assert (tmp_path / "train" / key).read_bytes() == bucket[f"mnist/train/{key}"]


def test_a_channel_no_longer_set_is_removed(s3, bucket, tmp_path: Path) -> None:
    copy_channels(s3, (TRAIN, EVAL), tmp_path, lambda _: None)
    copy_channels(s3, (EVAL,), tmp_path, lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["eval"]


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        (
            DataChannel("train", "no-such-bucket", "x/"),
            "data channel train: cannot list s3://no-such-bucket/x/: the bucket does not exist",
        ),
        (
            DataChannel("eval", BUCKET, "nothing/"),
            f"data channel eval: no objects under s3://{BUCKET}/nothing/",
        ),
    ],
)
def test_a_channel_that_cannot_be_read_is_one_line_naming_it(
    s3, bucket, tmp_path: Path, channel: DataChannel, message: str
) -> None:
    with pytest.raises(AgentError) as error:
        copy_channels(s3, (channel,), tmp_path, lambda _: None)
    assert str(error.value) == message


def test_data_that_does_not_fit_the_volume_is_refused_before_any_copy(
    s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(data_channels.shutil, "disk_usage", lambda _: usage(10**10, 0, 10**9))
    with pytest.raises(AgentError) as error:
        copy_channels(s3, (TRAIN,), tmp_path, lambda _: None)
    assert str(error.value) == (
        "data: 0.0 GB to copy, but the volume has 1.0 GB free (and keeps 1.1 GB for the run): "
        "raise volume_gb"
    )
    assert not (tmp_path / "train").exists()


def test_fabric_data_dir_is_the_channel_itself_when_there_is_one(tmp_path: Path) -> None:
    assert data_dir_variable(tmp_path, (TRAIN,)) == str(tmp_path / "train")
    assert data_dir_variable(tmp_path, (TRAIN, EVAL)) == str(tmp_path)


def test_a_key_that_is_also_another_keys_folder_is_one_line(s3, bucket, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="mnist/eval/labels.txt/extra.bin", Body=b"x")
    with pytest.raises(AgentError) as error:
        copy_channels(s3, (EVAL,), tmp_path, lambda _: None, workers=1)
    assert str(error.value) == (
        f"data channel eval: s3://{BUCKET}/mnist/eval/labels.txt is an object and also the "
        f"folder of s3://{BUCKET}/mnist/eval/labels.txt/extra.bin; a disk holds one of them"
    )
    assert not (tmp_path / "eval").exists()  # found at the listing, before any byte


def test_a_file_that_cannot_be_written_is_one_line_naming_it(s3, bucket, tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir(parents=True)
    (tmp_path / "eval" / "labels.txt").mkdir()  # a folder where the object must go
    with pytest.raises(AgentError) as error:
        copy_channels(s3, (EVAL,), tmp_path, lambda _: None, workers=1)
    assert str(error.value).startswith(
        f"data channel eval: cannot write s3://{BUCKET}/mnist/eval/labels.txt to "
    )
    assert not (tmp_path / data_channels.PARTIAL_DIR).exists()


def test_a_stop_meanwhile_ends_the_copy_and_keeps_what_is_whole(
    s3, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop of the cluster (or SIGTERM) during a long copy: no more objects start, what is
    whole is kept; the next start copies the rest. Leftovers of a killed copy are wiped."""
    monkeypatch.setattr(data_channels, "STOP_EVERY", 0.05)
    (tmp_path / data_channels.PARTIAL_DIR).mkdir(parents=True)
    (tmp_path / data_channels.PARTIAL_DIR / "7.a1b2c3").write_bytes(b"left by a killed copy")
    looks = []

    def stop() -> str | None:
        looks.append(1)
        return "node 1 failed (out of memory)" if len(looks) >= 2 else None

    with pytest.raises(data_channels.CopyStopped, match="node 1 failed"):
        copy_channels(s3, (TRAIN,), tmp_path, lambda _: None, workers=1, stop=stop)
    assert not (tmp_path / data_channels.PARTIAL_DIR / "7.a1b2c3").exists()
    rest = copy_channels(s3, (TRAIN,), tmp_path, lambda _: None)
    assert 0 < rest.files_copied < 3
    assert not (tmp_path / data_channels.PARTIAL_DIR).exists()
