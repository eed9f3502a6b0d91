"""Redeploys: what a node runs changes -> new nodes; nothing changed -> the same template;
the AMI is fixed per deploy (recorded in cdk.context.json, or the ami setting)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stacks.config import PROJECT_DIR
from stacks.nodes import GPU_AMI_PARAMETER, UBUNTU_AMI_PARAMETER
from tests.cfn import Synth, synthesized

ACCOUNT, REGION = "123456789012", "us-east-1"
PINNED = "ami-0123456789abcdef0"


def instance_ids(synth: Synth) -> list[str]:
    return sorted(synth.resources("AWS::EC2::Instance"))


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> Synth:
    return synthesized(tmp_path_factory)


def test_a_redeploy_with_nothing_changed_is_the_same_template_byte_for_byte(
    defaults: Synth, tmp_path: Path
) -> None:
    again = Synth(tmp_path)
    assert again.template_path.read_bytes() == defaults.template_path.read_bytes()


def test_changed_script_args_replace_every_node(defaults: Synth, tmp_path: Path) -> None:
    changed = Synth(tmp_path, script_args="--epochs 5")
    assert not set(instance_ids(changed)) & set(instance_ids(defaults))
    # Only the nodes (and what names them) change: the bucket and network stay.
    kept = set(defaults.template_dict["Resources"]) - set(instance_ids(defaults))
    assert kept <= set(changed.template_dict["Resources"])


def test_only_a_changed_shipped_file_of_the_project_replaces_the_nodes(
    defaults: Synth, tmp_path: Path
) -> None:
    """The example project copied elsewhere, with files that never ship: the same template.
    One more line in its script: new nodes."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT_DIR / "trainer", project, ignore=shutil.ignore_patterns("__pycache__"))
    junk = (
        "runs/local/step-1.ckpt",
        "__pycache__/train.cpython-311.pyc",
        ".git/HEAD",
        "env/pyvenv.cfg",
    )
    for name in junk:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("not shipped\n")
    same = Synth(tmp_path / "same", project=str(project))
    assert same.template_path.read_bytes() == defaults.template_path.read_bytes()
    with (project / "train.py").open("a") as script:
        script.write("# one more line\n")
    changed = Synth(tmp_path / "changed", project=str(project))
    assert not set(instance_ids(changed)) & set(instance_ids(defaults))


def _pinned_synth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Synth:
    """A synth as the CLI runs it with credentials: account and region known."""
    monkeypatch.setenv("CDK_DEFAULT_ACCOUNT", ACCOUNT)
    monkeypatch.setenv("CDK_DEFAULT_REGION", REGION)
    return Synth(tmp_path, **overrides)


def _lookup_key(parameter: str) -> str:
    return f"ssm:account={ACCOUNT}:parameterName={parameter}:region={REGION}"


CACHED_AZ = {f"availability-zones:account={ACCOUNT}:region={REGION}": ["us-east-1a"]}


@pytest.mark.parametrize(
    ("accelerator", "parameter"), [("cpu", UBUNTU_AMI_PARAMETER), ("gpu", GPU_AMI_PARAMETER)]
)
def test_with_credentials_the_ami_is_the_one_recorded_in_cdk_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accelerator: str, parameter: str
) -> None:
    gpu = {"instance_type": "g5.xlarge", "devices_per_node": "1"} if accelerator == "gpu" else {}
    synth = _pinned_synth(
        tmp_path,
        monkeypatch,
        accelerator=accelerator,
        **gpu,
        **CACHED_AZ,
        **{_lookup_key(parameter): PINNED},
    )
    for node in synth.instances_by_rank():
        assert node["Properties"]["ImageId"] == PINNED
    # No deploy-time lookup of the AMI is left in the template.
    assert parameter not in json.dumps(synth.template_dict)


def test_with_credentials_and_no_record_the_cli_is_asked_to_look_the_ami_up_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synth = _pinned_synth(tmp_path, monkeypatch, **CACHED_AZ)
    manifest = json.loads((synth.outdir / "manifest.json").read_text())
    missing = {entry["key"]: entry["provider"] for entry in manifest.get("missing", [])}
    assert missing == {_lookup_key(UBUNTU_AMI_PARAMETER): "ssm"}


def test_the_ami_setting_pins_an_image_without_any_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CDK_DEFAULT_ACCOUNT", raising=False)
    synth = Synth(tmp_path, ami="ami-0FEDCBA9876543210")
    for node in synth.instances_by_rank():
        assert node["Properties"]["ImageId"] == "ami-0fedcba9876543210"
    assert UBUNTU_AMI_PARAMETER not in json.dumps(synth.template_dict)


def test_offline_synth_says_the_ami_is_not_pinned(defaults: Synth) -> None:
    metadata = json.loads((defaults.outdir / "FabricCluster.metadata.json").read_text())
    warnings = [
        str(entry["data"])
        for entries in metadata.values()
        for entry in entries
        if entry["type"] == "aws:cdk:warning"
    ]
    assert any("ami: no AWS account and region at synth" in text for text in warnings)
