"""Runs: the name (what the nodes run, or the run setting), the restore from S3 (complete files
only, the newest checkpoint wins, a torn one is not used), the completion marker, the watch of
the other nodes' phases, and the stack's run, log group and permissions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from stacks.config import PROJECT_DIR, ConfigError, load_config
from stacks.run_name import run_name
from tests.cfn import Synth, cdk_json_context, synthesized
from trainer.train import newest_checkpoint
from userdata.run_state import COMPLETE_MARKER, completed, mark_complete, restore


def config(**overrides: Any):
    return load_config(cdk_json_context(**overrides).get)


def test_the_same_project_and_settings_are_the_same_run() -> None:
    assert run_name(config()) == run_name(config())
    assert run_name(config()).startswith("run-")
    # Where it trains is not what it trains.
    assert run_name(config(instance_type="c7i.xlarge", spot="true")) == run_name(config())
    # Nor its variables and keys (a new key continues the run); its data is.
    assert run_name(config(env="NCCL_DEBUG=INFO", secrets="K=/team/k")) == run_name(config())
    with_data = run_name(config(data="s3://my-data/mnist/"))
    assert run_name(config(data="s3://my-data/mnist")) == with_data
    assert run_name(config(data="train=s3://my-data/mnist/")) != with_data


@pytest.mark.parametrize(
    "change",
    [
        {"script_args": "--epochs 5"},
        {"num_nodes": "3"},
        {"precision": "bf16-mixed"},
        {"data": "s3://my-data/mnist/"},
    ],
)
def test_changed_arguments_or_world_size_start_a_new_run(change: dict[str, str]) -> None:
    assert run_name(config(**change)) != run_name(config())


def test_changed_code_starts_a_new_run(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text((PROJECT_DIR / "trainer" / "train.py").read_text())
    before = run_name(config(project=str(project)))
    (project / "runs").mkdir()
    (project / "runs" / "x.ckpt").write_text("never shipped: not part of the run's code")
    assert run_name(config(project=str(project))) == before
    with (project / "train.py").open("a") as script:
        script.write("# changed\n")
    assert run_name(config(project=str(project))) != before


def test_an_explicit_run_name_wins_and_is_checked() -> None:
    assert run_name(config(run="my-run.2", script_args="--epochs 9")) == "my-run.2"
    for bad in ("-x", "a/b", "x" * 65, "a b"):
        with pytest.raises(ConfigError, match=r"invalid setting run="):
            config(run=bad)
    with pytest.raises(ConfigError, match=r"invalid setting log_retention_days=.*30"):
        config(log_retention_days="31")


def put(s3: Any, bucket: str, key: str, body: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def checkpoint_bytes(step: int) -> bytes:
    path = Path(f"/tmp/fabric-test-{uuid.uuid4().hex}.ckpt")
    torch.save({"step": step, "model": {}, "optimizer": {}, "history": []}, path)
    data = path.read_bytes()
    path.unlink()
    return data


def test_restore_takes_complete_files_and_the_newest_readable_checkpoint_wins(
    s3: Any, tmp_path: Path
) -> None:
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    prefix = "Stack/run-1"
    put(s3, bucket, f"{prefix}/checkpoints/step-00000008.ckpt", checkpoint_bytes(8))
    put(s3, bucket, f"{prefix}/checkpoints/step-00000016.ckpt", checkpoint_bytes(16))
    put(s3, bucket, f"{prefix}/checkpoints/step-00000024.ckpt", b"torn: half a checkpoint")
    put(s3, bucket, f"{prefix}/checkpoints/step-00000032.ckpt.tmp", b"being written")
    put(s3, bucket, f"{prefix}/checkpoints/step-00000040.ckpt.unreadable", b"set aside")
    put(s3, bucket, f"{prefix}/metrics/version_0/metrics.csv", b"epoch,loss\n1,0.5\n")
    put(s3, bucket, "Stack/run-10/checkpoints/step-00000099.ckpt", b"another run")
    run_dir = tmp_path / "run"
    restored = restore(s3, f"s3://{bucket}/{prefix}", run_dir)
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    # Of the checkpoints only the newest two: S3 keeps every one a run ever saved.
    assert files == [
        "checkpoints/step-00000016.ckpt",
        "checkpoints/step-00000024.ckpt",
        "metrics/version_0/metrics.csv",
    ]
    assert restored.files == 3 and restored.describe() == "resumed from step 24"
    assert sorted(restored.paths) == sorted(run_dir / name for name in files)
    # The payload then skips the torn one (set aside) and resumes from the newest that loads.
    found = newest_checkpoint(run_dir / "checkpoints")
    assert found is not None and found[1]["step"] == 16
    assert (run_dir / "checkpoints" / "step-00000024.ckpt.unreadable").exists()


def test_a_shared_run_directory_that_holds_the_run_is_not_overwritten(
    s3: Any, tmp_path: Path
) -> None:
    """The shared file system outlives a node's restart: what the ranks wrote there since the
    last upload is newer than S3's copy, so a restarted node 0 restores nothing over it."""
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    put(s3, bucket, "Stack/run-3/checkpoints/step-00000008.ckpt", checkpoint_bytes(8))
    run_dir = tmp_path / "shared" / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    newer = run_dir / "checkpoints" / "step-00000012.ckpt"
    newer.write_bytes(checkpoint_bytes(12))
    (run_dir / "checkpoints" / "step-00000016.ckpt.tmp").write_bytes(b"being written")
    restored = restore(s3, f"s3://{bucket}/Stack/run-3", run_dir)
    assert not (run_dir / "checkpoints" / "step-00000008.ckpt").exists()
    assert restored.paths == [] and restored.step == 12
    assert restored.describe() == (
        "continued in the shared run directory (2 file(s), newest checkpoint step 12)"
    )


def test_a_new_run_restores_nothing_and_a_complete_one_says_so(s3: Any, tmp_path: Path) -> None:
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/Stack/run-2"
    assert restore(s3, uri, tmp_path / "run").describe() == "new run"
    assert completed(s3, uri) is None
    mark_complete(s3, uri, "run-2")
    marker = completed(s3, uri)
    assert marker and marker["run"] == "run-2" and marker["status"] == "complete"
    assert restore(s3, uri, tmp_path / "again").files == 0  # the marker is not a run file
    assert not (tmp_path / "again" / COMPLETE_MARKER).exists()


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory, log_retention_days="14")


def test_the_stack_names_its_run_and_its_log_group(synth: Synth) -> None:
    """The log group is the storage stack's (it outlives every cluster): the cluster imports
    it by the storage stack's export and names that stack in its outputs."""
    outputs = synth.template_dict["Outputs"]
    assert outputs["RunName"]["Value"] == run_name(config(log_retention_days="14"))
    assert synth.resources("AWS::Logs::LogGroup") == {}
    groups = synth.resources("AWS::Logs::LogGroup", synth.storage_dict)
    assert len(groups) == 1
    (logical_id, group), *_ = groups.items()
    assert group["Properties"]["RetentionInDays"] == 14
    assert group["DeletionPolicy"] == "Retain" and "LogGroupName" not in group["Properties"]
    storage_outputs = synth.storage_dict["Outputs"]
    assert storage_outputs["LogGroup"]["Value"] == {"Ref": logical_id}
    assert storage_outputs["LogGroup"]["Export"] == {"Name": "FabricStorage-LogGroup"}
    assert outputs["StorageStack"]["Value"] == "FabricStorage"
    user_data = json.dumps(synth.launch_template()["Properties"]["LaunchTemplateData"]["UserData"])
    assert "readonly RUN_NAME=" + outputs["RunName"]["Value"] in user_data
    assert "readonly LOG_GROUP=" in user_data and "FabricStorage-LogGroup" in user_data


def test_nodes_write_logs_only_to_their_group_and_read_only_the_cluster_parameters(
    synth: Synth,
) -> None:
    statements = [
        statement
        for policy in synth.resources("AWS::IAM::Policy").values()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]
    actions = lambda s: s["Action"] if isinstance(s["Action"], list) else [s["Action"]]  # noqa: E731
    logs = [s for s in statements if any(a.startswith("logs:") for a in actions(s))]
    assert sorted(a for s in logs for a in actions(s)) == [
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    ]
    # The storage stack's group, by its export: streams are per cluster (<stack>/node-<rank>).
    assert all(
        '"Fn::ImportValue": "FabricStorage-LogGroup"' in json.dumps(s["Resource"]) for s in logs
    )
    reads = [s for s in statements if "ssm:GetParameters" in actions(s)]
    for statement in reads:
        resources = statement["Resource"]
        resources = resources if isinstance(resources, list) else [resources]
        assert all(
            json.dumps(resource).endswith(('/main-address"]]}', '/members"]]}', '/stop"]]}'))
            for resource in resources
        ), resources


def test_a_complete_run_named_again_with_other_training_goes_on(s3: Any) -> None:
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/Stack/my-run"
    mark_complete(s3, uri, "my-run", fingerprint="a" * 64)
    assert completed(s3, uri, "a" * 64)
    assert completed(s3, uri, "b" * 64) is None  # -c run=my-run with more epochs: train on


def test_a_kept_bucket_carries_runs_over_to_a_new_stack(tmp_path: Path) -> None:
    """After cdk destroy (which keeps the bucket), -c artifacts_bucket=<it> continues runs."""
    synth = Synth(tmp_path, artifacts_bucket="fabriccluster-artifacts-kept")
    assert synth.resources("AWS::S3::Bucket") == {}
    assert synth.template_dict["Outputs"]["ArtifactsBucket"]["Value"] == (
        "fabriccluster-artifacts-kept"
    )
    policies = json.dumps(synth.resources("AWS::IAM::Policy"))
    assert ":s3:::fabriccluster-artifacts-kept/*" in policies
    user_data = json.dumps(synth.launch_template()["Properties"]["LaunchTemplateData"]["UserData"])
    assert "readonly ARTIFACTS_BUCKET=fabriccluster-artifacts-kept" in user_data
    with pytest.raises(ConfigError, match=r"invalid setting artifacts_bucket='Bad_Bucket'"):
        config(artifacts_bucket="Bad_Bucket")
