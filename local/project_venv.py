"""The local cluster's venv for a user's project: made by the node's own install step
(userdata/install.sh: torch held at the node's build, the project's dependencies, the agent's),
and cached under .venvs/ by the hash of everything that decides what it holds.

An installable project (a package) is installed from a copy of the files that ship, as a node
installs it from the payload: the user's folder gets no build/ or *.egg-info, the venv holds
exactly what ships, and a change to any shipped file makes a new venv."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from local.staging import copy_shipped
from local.torch_source import torch_source
from stacks.config import PROJECT_DIR
from training_project.dependencies import DEPENDENCY_FILES, installable
from training_project.load import Project
from training_project.shipping import shipped_files
from training_project.torch_pins import NODE_REQUIREMENTS

# Where project venvs live (a test points it elsewhere).
VENVS_DIR = Path(os.environ.get("FABRIC_VENVS_DIR") or PROJECT_DIR / ".venvs")
INSTALL_SCRIPT = PROJECT_DIR / "userdata" / "install.sh"
# The install step's code that decides what a venv holds: install.sh, the dependencies step and
# the torch family rule it imports (errors.py only words its failures), the agent's needs.
INSTALL_CODE = (
    INSTALL_SCRIPT,
    PROJECT_DIR / "training_project" / "dependencies.py",
    PROJECT_DIR / "training_project" / "torch_family.py",
    NODE_REQUIREMENTS,
)
DONE_MARKER = ".fabric-installed"


class InstallError(RuntimeError):
    """The project's dependencies could not be installed; the message is the installer's."""


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
    if installable(project.path):  # the venv holds the project itself
        for relative in shipped_files(project.path):
            digest.update(relative.as_posix().encode() + b"\0")
            digest.update(hashlib.sha256((project.path / relative).read_bytes()).digest())
    return digest.hexdigest()


def stage_shipped(project: Path, into: Path) -> Path:
    """A copy of what ships of the project, to build from. It stays beside the venv: the
    lock's workspace members (-e ./member) are installed from it."""
    copy_shipped(project, into)
    return into


def project_venv(project: Project, accelerator: str) -> Path:
    """The venv for this project, installed once per change of its dependencies."""
    source = torch_source()
    key = venv_key(project, accelerator, source)
    venv = VENVS_DIR / f"{project.path.name}-{key[:16]}"
    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    # Two runs at once (two `make local`, a test beside a rehearsal) would install into one
    # folder: the second waits for the first and then finds its venv made. One lock for the
    # folder: installs are rare, and a lock per venv would stay behind a failed one.
    with (VENVS_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / DONE_MARKER).is_file():
            print(f"[cluster] project venv: {venv} (cached)", flush=True)
            return venv
        install(project, accelerator, source, venv)
    return venv


def install(project: Project, accelerator: str, source: str, venv: Path) -> None:
    """install.sh into venv, from scratch; the marker says it is whole."""
    shutil.rmtree(venv, ignore_errors=True)  # what an interrupted install left
    print(f"[cluster] project venv: installing {project.path} into {venv}", flush=True)
    folder = project.path
    if installable(folder):  # its build writes into the folder it is given (build/, egg-info)
        folder = stage_shipped(folder, venv.with_name(venv.name + ".project"))
    with tempfile.TemporaryDirectory(prefix="fabric-install-") as work:
        error_file = Path(work) / "error.txt"
        command = [
            "bash", str(INSTALL_SCRIPT), "--uv", uv_binary(), "--venv", str(venv),
            "--python", sys.executable, "--accelerator", "cpu" if accelerator == "cpu" else "gpu",
            "--torch-version", project.torch_version, "--project", str(folder),
            "--requirements", str(NODE_REQUIREMENTS), "--error-file", str(error_file),
        ]  # fmt: skip
        env = {**os.environ, "FABRIC_TORCH_INDEX": source} if source else dict(os.environ)
        # Compiled once here, not by every node process at every start (a venv made by uv has
        # no .pyc files, and PYTHONDONTWRITEBYTECODE may keep Python from writing them).
        env["FABRIC_COMPILE_BYTECODE"] = "1"
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            if folder != project.path:
                shutil.rmtree(folder, ignore_errors=True)
            message = error_file.read_text().strip() if error_file.is_file() else ""
            raise InstallError(message or f"install.sh exited with status {result.returncode}")
    (venv / DONE_MARKER).write_text(json.dumps({"project": str(project.path)}) + "\n")
