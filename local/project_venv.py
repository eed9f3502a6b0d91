"""The local cluster's venv for a user's project: made by the node's own install step
(userdata/install.sh: torch held at the node's build, the project's dependencies, the agent's),
and cached under .venvs/ by the hash of everything that decides what it holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stacks.config import PROJECT_DIR
from stacks.project import NODE_REQUIREMENTS, Project
from userdata.dependencies import DEPENDENCY_FILES

# Where project venvs live (a test points it elsewhere).
VENVS_DIR = Path(os.environ.get("FABRIC_VENVS_DIR") or PROJECT_DIR / ".venvs")
INSTALL_SCRIPT = PROJECT_DIR / "userdata" / "install.sh"
INSTALL_CODE = (INSTALL_SCRIPT, PROJECT_DIR / "userdata" / "dependencies.py", NODE_REQUIREMENTS)
DONE_MARKER = ".fabric-installed"


class InstallError(RuntimeError):
    """The project's dependencies could not be installed; the message is the installer's."""


def torch_source() -> str:
    """Where torch comes from here: FABRIC_TORCH_INDEX, else pip's own find-links (a folder of
    wheels, as on machines without the PyTorch index), else the default of install.sh."""
    if os.environ.get("FABRIC_TORCH_INDEX"):
        return os.environ["FABRIC_TORCH_INDEX"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
        capture_output=True,
        text=True,
        check=False,
    )
    folder = result.stdout.strip().split()[0] if result.returncode == 0 and result.stdout else ""
    return folder if folder and Path(folder).is_dir() else ""


def uv_binary() -> str:
    try:
        from uv import find_uv_bin  # the uv of requirements.txt, the nodes' version
    except ImportError:
        found = shutil.which("uv")
        if not found:
            raise InstallError("uv is not installed: run `make venv`") from None
        return found
    return find_uv_bin()


def venv_key(project: Project, accelerator: str, source: str) -> str:
    digest = hashlib.sha256()
    inputs = {
        "python": sys.version,
        "accelerator": accelerator,
        "torch": project.torch_version,
        "torch_source": source,
    }
    digest.update(json.dumps(inputs, sort_keys=True).encode())
    files = [project.path / name for name in DEPENDENCY_FILES] + list(INSTALL_CODE)
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"(none)")
    return digest.hexdigest()


def project_venv(project: Project, accelerator: str) -> Path:
    """The venv for this project, installed once per change of its dependencies."""
    source = torch_source()
    key = venv_key(project, accelerator, source)
    venv = VENVS_DIR / f"{project.path.name}-{key[:16]}"
    if (venv / DONE_MARKER).is_file():
        print(f"[cluster] project venv: {venv} (cached)", flush=True)
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # what an interrupted install left
    print(f"[cluster] project venv: installing {project.path} into {venv}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fabric-install-") as work:
        error_file = Path(work) / "error.txt"
        command = [
            "bash", str(INSTALL_SCRIPT), "--uv", uv_binary(), "--venv", str(venv),
            "--python", sys.executable, "--accelerator", "cpu" if accelerator == "cpu" else "gpu",
            "--torch-version", project.torch_version, "--project", str(project.path),
            "--requirements", str(NODE_REQUIREMENTS), "--error-file", str(error_file),
        ]  # fmt: skip
        env = {**os.environ, "FABRIC_TORCH_INDEX": source} if source else dict(os.environ)
        # Compiled once here, not by every node process at every start (a venv made by uv has
        # no .pyc files, and PYTHONDONTWRITEBYTECODE may keep Python from writing them).
        env["FABRIC_COMPILE_BYTECODE"] = "1"
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            message = error_file.read_text().strip() if error_file.is_file() else ""
            raise InstallError(message or f"install.sh exited with status {result.returncode}")
    (venv / DONE_MARKER).write_text(json.dumps({"project": str(project.path)}) + "\n")
    return venv
