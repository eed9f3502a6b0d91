"""boot.sh with its real install phases (uv given, as in a rehearsal): a project whose
dependency cannot be installed fails the boot in phase install, records the installer's own
message as the node's phase, and would power the node off (stop_when_done).

Against moto (S3 for the payload, SSM for the phase) and the IMDSv2 stub, on 127.0.0.1; the
install itself reaches PyPI, as test_install does.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.slow  # boot.sh's real install phase


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
