"""The node payload, one S3 asset: the user's project (under project/), the node agent (under
userdata/), what its install step reads the project with (under training_project/) and the
run's inputs (inputs.json: data channels, variables, the secrets' names). Only
shipped files are staged, so nothing else changes the asset's hash."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from stacks.config import PROJECT_DIR, ClusterConfig, ConfigError
from training_project.errors import ProjectError
from training_project.shipping import check_size, shipped_files
from userdata.run_inputs import INPUTS_FILE

AGENT_DIR = PROJECT_DIR / "userdata"
TRAINING_PROJECT_DIR = PROJECT_DIR / "training_project"
PAYLOAD_PROJECT = "project"  # where the project lies in the payload: fabric run's working dir
PAYLOAD_AGENT = "userdata"
# Beside userdata/ (the payload's root is install.sh's PYTHONPATH): its dependencies step.
PAYLOAD_TRAINING_PROJECT = "training_project"
_AGENT_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage_payload(config: ClusterConfig, root: Path) -> list[Path]:
    """Copies what ships into root; returns the project's files (relative to the project)."""
    files = shipped_files(config.project)
    try:
        check_size(config.project, files)
    except ProjectError as error:  # one line at synth, as every bad setting is
        raise ConfigError(str(error)) from None
    for relative in files:
        target = root / PAYLOAD_PROJECT / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(config.project / relative, target)
    shutil.copytree(AGENT_DIR, root / PAYLOAD_AGENT, ignore=_AGENT_IGNORED)
    shutil.copytree(TRAINING_PROJECT_DIR, root / PAYLOAD_TRAINING_PROJECT, ignore=_AGENT_IGNORED)
    # Channels, variables and the secrets' names: the agent reads them (values are read at boot).
    (root / INPUTS_FILE).write_text(config.inputs.to_json())
    return files


def payload_asset(scope: Construct, construct_id: str, config: ClusterConfig) -> s3_assets.Asset:
    with tempfile.TemporaryDirectory(prefix="fabric-payload-") as staging:
        stage_payload(config, Path(staging))
        # The asset is copied into the cloud assembly here, so the staging folder can go.
        return s3_assets.Asset(scope, construct_id, path=staging)
