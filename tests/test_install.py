"""The node's install step: userdata/install.sh run for real (CPU), and boot.sh's call of it.

The real install is the one test that leaves 127.0.0.1: it reaches PyPI for uv's wheel (through
boot.sh's own uv phase), lightning and the other node requirements. torch comes from this
machine's CPU wheel when it has one (FABRIC_TORCH_INDEX=/opt/wheels), else from the PyTorch CPU
index as on EC2. uv's downloads are cached under .pytest_cache (uv's cache is made to be shared
between runs): about 1 GB, 50 s cold, 30 s warm on 2 cores.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stacks.cluster_app import cdk_json_context
from stacks.config import PROJECT_DIR, load_config
from stacks.project import NODE_REQUIREMENTS, pinned_version
from stacks.user_data import UV_VERSION, UV_WHEEL_SHA256, UV_WHEEL_URL, render_boot_script

INSTALL_SCRIPT = PROJECT_DIR / "userdata" / "install.sh"
EXAMPLE_PROJECT = PROJECT_DIR / "trainer"
TORCH_VERSION = pinned_version("torch")
LOCAL_WHEELS = Path("/opt/wheels")


def rendered_boot_script() -> str:
    config = load_config(cdk_json_context().get)
    return render_boot_script(
        config, region="us-east-1", payload_url="s3://bucket/payload.zip", artifacts_bucket="b"
    )


def install_call(script: str) -> str:
    """boot.sh's command line that runs install.sh, continuation lines joined."""
    match = re.search(r"^[^#\n]*userdata/install\.sh(?:.*\\\n)*.*$", script, re.MULTILINE)
    assert match, "boot.sh does not run userdata/install.sh"
    return match.group(0)


def install_command(uv: Path, venv: Path, project: Path = EXAMPLE_PROJECT) -> list[str]:
    """install.sh for the CPU case, as boot.sh calls it, with this machine's Python."""
    arguments = {
        "--uv": uv,
        "--venv": venv,
        "--python": sys.executable,
        "--accelerator": "cpu",
        "--torch-version": TORCH_VERSION,
        "--project": project,
        "--requirements": NODE_REQUIREMENTS,
        "--error-file": venv.parent / "install-error.txt",
    }
    return [
        "bash",
        str(INSTALL_SCRIPT),
        *(str(part) for item in arguments.items() for part in item),
    ]


def test_boot_script_runs_install_sh_with_every_argument_it_takes() -> None:
    call = install_call(rendered_boot_script())
    passed = set(re.findall(r"(?<!\S)--[a-z][a-z-]*", call))
    accepted = set(re.findall(r"^\s*(--[a-z][a-z-]*)\)", INSTALL_SCRIPT.read_text(), re.M))
    assert passed == accepted
    assert call.lstrip().startswith("bash ")  # a zip extraction keeps no executable bit


def test_boot_script_checks_uv_before_using_it() -> None:
    script = rendered_boot_script()
    assert f"readonly UV_WHEEL_SHA256={UV_WHEEL_SHA256}" in script
    assert f"readonly UV_WHEEL_URL={UV_WHEEL_URL}" in script
    assert "sha256sum --check --strict" in script
    assert script.index("sha256sum --check") < script.index('"$uv" --version')
    assert "astral.sh" not in script
    assert not re.search(r"(^|[|\s])sh\s*$", script, re.MULTILINE)  # no download piped to sh
    wheel = f"uv-{UV_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    assert UV_WHEEL_URL.endswith("/" + wheel)


def test_install_script_passes_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", "-x", str(INSTALL_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--accelerator", "tpu"], "--accelerator must be cpu or gpu, not 'tpu'"),
        (["--color"], "--color needs a value"),
        (["--color", "red"], "unknown argument --color"),
    ],
)
def test_install_script_refuses_bad_arguments(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    uv = tmp_path / "uv"
    uv.write_text("#!/bin/sh\nexit 99\n")
    uv.chmod(0o755)
    result = subprocess.run(
        [*install_command(uv, tmp_path / "venv"), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "venv").exists()


def boot_uv_phase(script: str, fabric_home: Path) -> str:
    """boot.sh's own uv phase (download, sha256 check, unpack), runnable on its own."""
    settings = re.findall(r"^readonly UV_\w+=.*$", script, re.MULTILINE)
    phase = re.search(r'^  begin uv .*?^  "\$uv" --version$', script, re.MULTILINE | re.DOTALL)
    assert settings and phase, "boot.sh has no uv phase"
    return "\n".join(
        [
            "set -euo pipefail",
            *settings,
            f"FABRIC_HOME={shlex.quote(str(fabric_home))}",
            'begin() { echo "phase $1: $2"; }',
            phase.group(0),
        ]
    )


@pytest.fixture(scope="module")
def uv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uv as a node gets it: boot.sh's uv phase run here (its PyPI wheel, sha256-checked)."""
    fabric_home = tmp_path_factory.mktemp("fabric-home")
    result = subprocess.run(
        ["bash", "-c", boot_uv_phase(rendered_boot_script(), fabric_home)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": OK" in result.stdout  # sha256sum --check
    assert f"uv {UV_VERSION} (x86_64-unknown-linux-gnu" in result.stdout
    return fabric_home / "bin" / "uv"


def local_torch_wheels() -> Path | None:
    """This machine's folder of CPU torch wheels, when it holds the pinned one."""
    if any(LOCAL_WHEELS.glob(f"torch-{TORCH_VERSION}+cpu-*.whl")):
        return LOCAL_WHEELS
    return None


def install_environment(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "FABRIC_", "VIRTUAL"))}
    env.update(UV_CACHE_DIR=str(cache_dir), UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    wheels = local_torch_wheels()
    if wheels:
        env["FABRIC_TORCH_INDEX"] = str(wheels)
    return env


def test_a_dependency_that_cannot_be_installed_fails_with_the_installers_own_message(
    uv: Path, uv_cache: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("fabric-cluster-no-such-package==1.0\n")
    venv = tmp_path / "venv"
    install = subprocess.run(
        install_command(uv, venv, project),
        env=install_environment(uv_cache),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert install.returncode == 1
    message = (tmp_path / "install-error.txt").read_text()
    assert message.count("\n") == 1  # one line
    assert message.startswith("install: ")
    assert "fabric-cluster-no-such-package" in message and "not found" in message
