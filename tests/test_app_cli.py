"""The app as users run it: `python3 app.py` the way the CDK CLI starts it, and the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stacks.config import PROJECT_DIR
from tests.cfn import cdk_json_context

CDK = PROJECT_DIR / "node_modules" / ".bin" / "cdk"


def run_app(outdir: Path, **overrides: Any) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CDK_CONTEXT_JSON": json.dumps(cdk_json_context(**overrides)),
        "CDK_OUTDIR": str(outdir),
    }
    return subprocess.run(
        [sys.executable, "app.py"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


# One bad value per key; tests/test_config.py covers many more of each.
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_nodes", "0"),
        ("devices_per_node", "x"),
        ("accelerator", "tpu"),
        ("instance_type", "huge"),
        ("volume_gb", "10"),
        ("ssh_cidr", "1.2.3.4"),
        ("key_pair", "a\tb"),
        ("main_port", "22"),
        ("script", "nope.py"),
        ("project", "no-such-folder"),
        ("script_args", "'"),
        ("stop_when_done", "maybe"),
        ("stack_name", "_x"),
    ],
)
def test_bad_value_is_one_line_exit_1_and_no_template(tmp_path: Path, key: str, value: str) -> None:
    result = run_app(tmp_path / "out", **{key: value})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: invalid setting {key}={value!r}: " + lines[0].split(": ", 2)[2]]
    assert "Traceback" not in result.stderr + result.stdout
    assert not list((tmp_path).rglob("*.template.json"))


def test_real_cdk_cli_synth_from_clean_cdk_out(tmp_path: Path) -> None:
    assert CDK.exists(), "run the tests with `make test`: it installs the pinned aws-cdk CLI"
    project = tmp_path / "project"
    shutil.copytree(
        PROJECT_DIR,
        project,
        # Only the app: no venvs, caches (uv's is a GB under .pytest_cache) or outputs.
        ignore=shutil.ignore_patterns(
            ".venv*", "node_modules", "cdk.out", ".git", "runs", ".*_cache", ".hypothesis"
        ),
    )
    # As a user types it: `python3` is the system one, without the CDK; app.py hands over to
    # the project's venv (linked here, as `make venv` would have made it).
    venv_bin = str(Path(sys.executable).parent)
    path = ":".join(p for p in os.environ["PATH"].split(":") if p != venv_bin)
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = {
        **{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        "PATH": path,
        "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
    }

    def synth(*context: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CDK), "synth", "--quiet", *(arg for c in context for arg in ("-c", c))],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )

    good = synth("num_nodes=3", "stop_when_done=false")
    assert good.returncode == 0, good.stdout + good.stderr
    # cdk.json carries the flags of `cdk init` for the pinned CDK: today's safe defaults.
    assert "feature flags are not configured" not in good.stdout + good.stderr
    template = json.loads((project / "cdk.out" / "FabricCluster.template.json").read_text())
    instances = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::Instance"]
    assert len(instances) == 3

    shutil.rmtree(project / "cdk.out")
    bad = synth("num_nodes=100")
    assert bad.returncode != 0
    assert "error: invalid setting num_nodes='100': expected an integer from 1 to 64" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not list((project / "cdk.out").glob("*.template.json"))

    typo = synth("num_node=4")
    assert typo.returncode != 0
    assert "error: unknown setting num_node: did you mean num_nodes?" in typo.stderr
    assert not list((project / "cdk.out").glob("*.template.json"))

    (project / ".venv").unlink()
    no_venv = synth()
    assert no_venv.returncode != 0
    assert "error: aws-cdk-lib is not installed: run `make venv`" in no_venv.stderr
    assert "Traceback" not in no_venv.stderr
