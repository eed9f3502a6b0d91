"""The node payload: trainer/, userdata/ and the configured script, as one S3 asset."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from stacks.config import PROJECT_DIR

PAYLOAD_FOLDERS = ("trainer", "userdata")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


def payload_asset(
    scope: Construct, construct_id: str, script: str, project_dir: Path = PROJECT_DIR
) -> s3_assets.Asset:
    """Stages exactly what a node needs, so unrelated files never change the asset hash."""
    with tempfile.TemporaryDirectory(prefix="fabric-payload-") as staging:
        root = Path(staging)
        for folder in PAYLOAD_FOLDERS:
            shutil.copytree(project_dir / folder, root / folder, ignore=_IGNORED)
        target = root / script
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project_dir / script, target)
        # The asset is copied into the cloud assembly here, so the staging folder can go.
        return s3_assets.Asset(scope, construct_id, path=str(root))
