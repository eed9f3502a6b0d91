"""boot.sh with its real install phases (uv given, as in a rehearsal): a project whose
dependency cannot be installed fails the boot in phase install, records the installer's own
message as the node's phase, and would power the node off (stop_when_done). And the shared
file system: mounted by userdata/shared_fs.sh (with stand-ins for mount, on a scratch fstab:
nothing here mounts or edits this machine), checked again at every start of the agent.

Against moto (S3 for the payload, SSM for the phase) and the IMDSv2 stub, on 127.0.0.1; the
install itself reaches PyPI, as test_install does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from local.project_venv import torch_source, uv_binary
from rehearsal.emulated_aws import zip_directory
from rehearsal.imds_stub import ImdsStub, node_values
from stacks.cluster_app import cdk_json_context
from stacks.config import load_config
from stacks.payload import stage_payload
from stacks.user_data import render_boot_script
from userdata.phase import decode_phase

SHARED_FS_SCRIPT = Path(__file__).resolve().parent.parent / "userdata" / "shared_fs.sh"
EFS_NAME = "fs-0123456789abcdef0.efs.us-east-1.amazonaws.com"


def stand_ins(folder: Path, mounts_after: int) -> dict[str, str]:
    """mount, mountpoint and mount.nfs4 that only write down what they were asked: the mount
    succeeds at its `mounts_after`-th call (0: never)."""
    folder.mkdir()
    commands = {
        "mount.nfs4": "exit 0",
        "mountpoint": f"[[ -f {folder}/mounted ]]",
        "mount": f"""echo "$*" >>{folder}/mount-calls
(( $(wc -l <{folder}/mount-calls) == {mounts_after} )) && touch {folder}/mounted""",
    }
    for name, body in commands.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def shared_fs(
    env: dict[str, str], fstab: Path, mount_point: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(SHARED_FS_SCRIPT), "--fstab", str(fstab), *options]
    return subprocess.run(
        [*command, EFS_NAME, str(mount_point)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_shared_file_system_is_mounted_after_retries_and_written_to_fstab_once(
    tmp_path: Path,
) -> None:
    env = stand_ins(tmp_path / "bin", mounts_after=3)
    fstab, mount_point = tmp_path / "fstab", tmp_path / "mnt" / "fabric-shared"
    first = shared_fs(env, fstab, mount_point, "--retry-every", "0.1")
    assert first.returncode == 0, first.stdout + first.stderr
    calls = (tmp_path / "bin" / "mount-calls").read_text().splitlines()
    assert len(calls) == 3  # a new mount target's name resolves late: tried again
    assert calls[0].startswith("-t nfs4 -o nfsvers=4.1,rsize=1048576,wsize=1048576,hard,")
    assert calls[0].endswith(f"{EFS_NAME}:/ {mount_point}")
    again = shared_fs(env, fstab, mount_point)  # the agent's start: mounted already
    assert again.returncode == 0 and len(calls) == 3
    assert f"{EFS_NAME} mounted at {mount_point}" in again.stdout
    lines = fstab.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{EFS_NAME}:/ {mount_point} nfs4 ")
    assert ",_netdev,nofail 0 0" in lines[0]


def test_a_shared_file_system_that_never_mounts_is_one_line_within_the_bound(
    tmp_path: Path,
) -> None:
    env = stand_ins(tmp_path / "bin", mounts_after=0)
    result = shared_fs(
        env, tmp_path / "fstab", tmp_path / "mnt", "--wait", "1", "--retry-every", "0.2"
    )
    assert result.returncode == 1
    said = [line for line in result.stdout.splitlines() if "did not mount" in line]
    assert len(said) == 1 and "within 1 s" in said[0] and "NFS 2049" in said[0]


def test_an_agent_start_without_the_shared_file_system_records_why_and_powers_off(
    aws_env: dict[str, str], s3, ssm, tmp_path: Path
) -> None:
    """After a stop and start, fstab's mount may have failed (nofail): the agent's start says
    so as the node's phase, stops the cluster, and would power off, instead of training in an
    empty folder of its own or idling. The rehearsal's folder stands for the mount here."""
    stack = f"BootTest{uuid.uuid4().hex[:8]}"
    config = load_config(cdk_json_context(stack_name=stack).get)
    staged = tmp_path / "payload"
    stage_payload(config, staged)
    bucket = f"boot-test-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="payload.zip", Body=zip_directory(staged))
    for rank in range(config.num_nodes):
        ssm.put_parameter(Name=config.phase_parameter(rank), Value="booting", Type="String")
    script = tmp_path / "user-data.sh"
    script.write_text(
        render_boot_script(
            config,
            region="us-east-1",
            payload_url=f"s3://{bucket}/payload.zip",
            artifacts_bucket=bucket,
            run_name="run-a1",
            shared_fs=EFS_NAME,
        )
    )
    missing = tmp_path / "shared"  # not there: the file system is not mounted
    env = {
        **aws_env,
        "FABRIC_REHEARSAL_HOME": str(tmp_path / "fabric"),
        "FABRIC_REHEARSAL_VENV": sys.prefix,
        "FABRIC_REHEARSAL_SHARED_DIR": str(missing),
    }
    with ImdsStub(node_values("i-0123456789abcdef0", "127.0.0.1", 0, 2)) as imds:
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.url
        boot = subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=120
        )
    print(boot.stdout[-4000:], boot.stderr[-2000:], sep="\n")
    assert boot.returncode == 1
    phase = decode_phase(
        ssm.get_parameter(Name=config.phase_parameter(0))["Parameter"]["Value"]
    ).text
    # A folder per run: a redeploy that starts a new run keeps the file system, not the run.
    run_dir = missing / "runs" / "run-a1"
    assert phase == f"failed: sharedfs: {EFS_NAME} is not mounted (the run directory {run_dir})"
    stop = ssm.get_parameter(Name=config.stop_parameter)["Parameter"]["Value"]
    assert "failed" in stop and "sharedfs" in stop  # node 1 stops too
    assert "stop_when_done: would power off now" in boot.stdout
    assert "userdata.agent" not in boot.stdout and not missing.exists()


@pytest.mark.slow  # boot.sh's real install phase
def test_a_dependency_that_cannot_be_installed_fails_the_boot_in_phase_install(
    aws_env: dict[str, str], s3, ssm, uv_cache: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('never runs')\n")
    (project / "requirements.txt").write_text("fabric-cluster-no-such-package==1.0\n")
    stack = f"BootTest{uuid.uuid4().hex[:8]}"
    config = load_config(
        cdk_json_context(stack_name=stack, project=str(project), script="main.py").get
    )
    staged = tmp_path / "payload"
    stage_payload(config, staged)
    bucket = f"boot-test-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="payload.zip", Body=zip_directory(staged))
    ssm.put_parameter(Name=config.phase_parameter(0), Value="booting", Type="String")
    script = tmp_path / "user-data.sh"
    script.write_text(
        render_boot_script(
            config,
            region="us-east-1",
            payload_url=f"s3://{bucket}/payload.zip",
            artifacts_bucket=bucket,
        )
    )
    env = {
        **aws_env,
        "FABRIC_REHEARSAL_HOME": str(tmp_path / "fabric"),
        "FABRIC_REHEARSAL_UV": uv_binary(),
        "FABRIC_REHEARSAL_PYTHON": sys.executable,
        "UV_CACHE_DIR": str(uv_cache),
    }
    if torch_source():
        env["FABRIC_TORCH_INDEX"] = torch_source()
    with ImdsStub(node_values("i-0123456789abcdef0", "127.0.0.1", 0, 1)) as imds:
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.url
        boot = subprocess.run(
            ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300
        )
    print(boot.stdout[-4000:], boot.stderr[-2000:], sep="\n")
    assert boot.returncode != 0
    recorded = ssm.get_parameter(Name=config.phase_parameter(0))["Parameter"]["Value"]
    assert decode_phase(recorded).instance == "i-0123456789abcdef0"
    phase = decode_phase(recorded).text
    assert phase.startswith("failed: install: ")
    assert "fabric-cluster-no-such-package was not found in the package registry" in phase
    assert "\n" not in phase
    assert "FAILED in phase install" in boot.stdout
    assert "stop_when_done: would power off now" in boot.stdout
    assert "phase agent" not in boot.stdout  # no agent, no fabric run
