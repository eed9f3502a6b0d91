"""The payload alone (plain `python trainer/train.py`, one process) and its data option."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from torch.overrides import TorchFunctionMode

from stacks.config import PROJECT_DIR
from trainer import train as payload
from userdata.artifacts import ArtifactSync


def train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "trainer/train.py", *args],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
def test_trains_on_data_from_a_local_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    y = (x[:, 0] > 0).long()  # a learnable rule
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    result = train(
        "--data",
        str(tmp_path / "data.pt"),
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"], summary["steps"]) == (1, 1, 3 * 16)
    assert summary["final_loss"] < summary["first_loss"]


@pytest.mark.slow
def test_trains_on_a_folder_of_data_files_from_fabric_data_dir(tmp_path: Path) -> None:
    """A data channel's copy: every *.pt of $FABRIC_DATA_DIR, in name order; --show-env."""
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "channel"
    (folder / "part-2").mkdir(parents=True)
    for name, count in (("part-1.pt", 256), ("part-2/b.pt", 128)):
        x = torch.randn(count, 8, generator=generator)
        torch.save({"x": x, "y": (x[:, 0] > 0).long()}, folder / name)
    (folder / "README.txt").write_text("not data")
    result = subprocess.run(
        [sys.executable, "trainer/train.py", "--epochs", "1", "--batch-size", "32",
         "--run-dir", str(tmp_path / "run"), "--show-env", "TOKEN", "--show-env", "ABSENT"],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "FABRIC_DATA_DIR": str(folder), "TOKEN": "tok-123"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["data"], summary["samples"], summary["steps"]) == (str(folder), 384, 12)
    assert summary["env_sha256"] == {
        "TOKEN": hashlib.sha256(b"tok-123").hexdigest(),
        "ABSENT": None,
    }
    assert "env TOKEN=tok-123" in result.stdout and "env ABSENT=(not set)" in result.stdout


@pytest.mark.slow
def test_missing_data_is_one_clear_error(tmp_path: Path) -> None:
    result = train("--data", str(tmp_path / "nope.pt"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"error: cannot read --data {tmp_path / 'nope.pt'}: " in result.stderr


@pytest.mark.slow
def test_unreadable_data_is_one_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "data.pt"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for location in (garbage, folder):
        result = train("--data", str(location), "--run-dir", str(tmp_path / "run"))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"error: cannot read --data {location}: " in result.stderr


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_skipped_not_resumed(tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    corrupt = checkpoints / "step-00000008.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    result = train(
        "--epochs",
        "1",
        "--samples",
        "512",
        "--batch-size",
        "32",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: skipping unreadable checkpoint {corrupt}" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == summary["steps_this_run"] == 16  # trained from the start


@pytest.mark.slow
def test_a_checkpoint_of_another_model_width_fails_with_one_line(tmp_path: Path) -> None:
    run = ["--epochs", "1", "--samples", "512", "--batch-size", "32", "--run-dir", str(tmp_path)]
    assert train(*run, "--hidden", "32").returncode == 0
    (tmp_path / "summary.json").unlink()
    result = train(*run, "--epochs", "2", "--hidden", "64")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "does not fit this model" in result.stderr
    assert "resume with the options it was trained with" in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000016.ckpt"]


FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.scalar_tensor,
}


class FactoryCalls(TorchFunctionMode):
    """Records the device= of each tensor factory that the payload's main() calls itself."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_code  # factories are C functions: the caller is next
        if func in FACTORIES and caller is payload.main.__code__:
            self.calls.append((func.__name__, kwargs.get("device")))
        return func(*args, **kwargs)


class OddDeviceFabric(Fabric):
    """A Fabric whose device is cpu:0, which no tensor gets by default or from loss.device
    (a CPU tensor's device is plain cpu): only an explicit device=fabric.device matches."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu", 0)


def test_every_tensor_the_payload_makes_is_on_fabric_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a GPU a CPU tensor here fails ("Expected all tensors to be on the same device") and
    # NCCL refuses it; on CPU nothing fails, so check that each one names fabric.device.
    monkeypatch.setattr(payload, "Fabric", OddDeviceFabric)
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # seed_everything sets it: removed afterwards
    handler = signal.getsignal(signal.SIGUSR1)  # main() installs its own
    args = ["--epochs", "2", "--samples", "256", "--batch-size", "64", "--run-dir", str(tmp_path)]
    recorder = FactoryCalls()
    try:
        with recorder:
            payload.main(args)
    finally:
        signal.signal(signal.SIGUSR1, handler)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2 * 4
    assert len(recorder.calls) >= 3, recorder.calls  # the metrics, the stop flag, the count
    wrong = [(name, device) for name, device in recorder.calls if device != torch.device("cpu", 0)]
    assert wrong == [], f"tensors made off fabric.device: {wrong}"


def main_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The payload's main() here, on CPU; the process-wide things it sets are put back."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # seed_everything sets it: removed afterwards
    handler = signal.getsignal(signal.SIGUSR1)  # main() installs its own
    try:
        payload.main(args)
    finally:
        signal.signal(signal.SIGUSR1, handler)


def test_a_save_that_fails_halfway_leaves_only_a_temporary_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    s3: Any,
) -> None:
    # As if the machine died while writing the third checkpoint (end of epoch 3, step 24):
    # some bytes are on disk, and the final name must not be among them.
    run_dir = tmp_path / "run"
    args = ["--epochs", "4", "--samples", "256", "--batch-size", "32", "--run-dir", str(run_dir)]
    real_save = Fabric.save
    saves: list[Path] = []

    def dies_at_the_third_save(self: Fabric, path: str | Path, *rest: Any, **kw: Any) -> None:
        saves.append(Path(path))
        if len(saves) == 3:
            Path(path).write_bytes(b"PK\x03\x04 the first bytes of a checkpoint")
            raise OSError(28, "No space left on device")
        real_save(self, path, *rest, **kw)

    monkeypatch.setattr(Fabric, "save", dies_at_the_third_save)
    with pytest.raises(OSError, match="No space left on device"):
        main_in_process(args, monkeypatch)
    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "step-00000008.ckpt",
        "step-00000016.ckpt",
        "step-00000024.ckpt.tmp",  # only the temporary name of the step that failed
    ]
    bucket = f"halfway-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    ArtifactSync(s3, f"s3://{bucket}/run", run_dir).stop()  # what the agent uploads at the end
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "run/checkpoints/step-00000016.ckpt" in keys
    assert [key for key in keys if "step-00000024" in key] == []

    monkeypatch.setattr(Fabric, "save", real_save)
    capsys.readouterr()
    main_in_process(args, monkeypatch)
    out = capsys.readouterr().out
    assert f"resumed from {checkpoints / 'step-00000016.ckpt'} at step 16" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"]) == (32, 16)
    assert summary["checkpoint"] == str(checkpoints / "step-00000032.ckpt")
    assert torch.load(summary["checkpoint"], weights_only=True)["step"] == 32
    assert not list(checkpoints.glob("*.tmp"))  # the step's save that worked replaced it


def fails_at_save(number: int) -> Callable[..., None]:
    """A Fabric.save that fails as a full disk does at its `number`-th call (the run dies there,
    after the epoch's metrics row was saved and before its checkpoint was)."""
    real_save = Fabric.save
    calls = 0

    def save(self: Fabric, path: str | Path, *rest: Any, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == number:
            raise OSError(28, "No space left on device")
        real_save(self, path, *rest, **kw)

    return save


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics" / "version_0" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_metrics_csv_keeps_every_step_once_across_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    # 8 steps an epoch, a row each epoch end. Each run dies saving a checkpoint after its row
    # was written, so the next one resumes before that row and logs its step again.
    run_dir = tmp_path / "run"
    args = ["--samples", "256", "--batch-size", "32", "--run-dir", str(run_dir)]
    real_save = Fabric.save
    monkeypatch.setattr(Fabric, "save", fails_at_save(3))  # step 24: rows 8, 16, 24
    with pytest.raises(OSError, match="No space left on device"):
        main_in_process([*args, "--epochs", "4"], monkeypatch)
    assert [row["step"] for row in metrics_rows(run_dir)] == ["8", "16", "24"]
    monkeypatch.setattr(Fabric, "save", fails_at_save(2))  # from 16; step 32: 24 saved
    with pytest.raises(OSError, match="No space left on device"):
        main_in_process([*args, "--epochs", "4"], monkeypatch)
    assert [row["step"] for row in metrics_rows(run_dir)] == ["8", "16", "24", "32"]
    monkeypatch.setattr(Fabric, "save", real_save)
    capsys.readouterr()
    main_in_process([*args, "--epochs", "5"], monkeypatch)
    assert "at step 24" in capsys.readouterr().out
    rows = metrics_rows(run_dir)
    assert [(row["epoch"], row["step"]) for row in rows] == [
        ("1", "8"),
        ("2", "16"),
        ("3", "24"),
        ("4", "32"),
        ("5", "40"),
    ]
    assert all(row["loss"] and row["accuracy"] for row in rows)
    assert not [w for w in recwarn if "will be deleted" in str(w.message)]


def test_a_resumed_metrics_csv_takes_new_columns(tmp_path: Path) -> None:
    log_dir = tmp_path / "metrics" / "version_0"
    log_dir.mkdir(parents=True)
    # Rows past the resumed step (30) are dropped, and a torn last append with them.
    (log_dir / "metrics.csv").write_text("loss,step\n0.9,10\n0.8,20\n0.7,30\n0.6,40\n0.5\n")
    logger = payload.ContinuedCSVLogger(
        root_dir=tmp_path, name="metrics", version=0, resumed_step=30
    )
    logger.log_metrics({"loss": 0.4, "accuracy": 0.5}, step=40)  # a new column
    logger.save()
    logger.log_metrics({"loss": 0.3, "accuracy": 0.6}, step=50)
    logger.save()
    with (log_dir / "metrics.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == ["accuracy", "loss", "step"]
        rows = [(row["step"], row["loss"], row["accuracy"]) for row in reader]
    assert rows == [
        ("10", "0.9", ""),
        ("20", "0.8", ""),
        ("30", "0.7", ""),
        ("40", "0.4", "0.5"),
        ("50", "0.3", "0.6"),
    ]
