"""Where torch comes from on this machine, by the rule of userdata/install.sh: FABRIC_TORCH_INDEX
(an index URL, or a local folder of wheels), else pip's own configured find-links folder (a
machine without the PyTorch index keeps its CPU wheels there), else the PyTorch CPU index.

    python3 -m local.torch_source     # the pip arguments for it, e.g. --find-links /opt/wheels

Standard library only: the Makefile runs it before the venv has any package, to install the CPU
torch first (PyPI's Linux torch is the multi-GB CUDA build).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# install.sh's default for a CPU node.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def pip_find_links(env: Mapping[str, str] | None = None, python: str = sys.executable) -> str:
    """The first find-links folder of pip's configuration (files and PIP_FIND_LINKS) that exists;
    "" when there is none, or no pip to ask."""
    try:
        result = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            env=dict(os.environ if env is None else env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    # Lines such as global.find-links='/opt/wheels' or :env:.find-links='/a file:///b'.
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            for location in value.strip().strip("'\"").split():
                folder = location.removeprefix("file://")
                if Path(folder).is_dir():
                    return folder
    return ""


def torch_source(env: Mapping[str, str] | None = None, python: str = sys.executable) -> str:
    """FABRIC_TORCH_INDEX, else pip's find-links folder; "" for install.sh's default (the
    PyTorch CPU index for cpu, PyPI for gpu)."""
    environment = os.environ if env is None else env
    return environment.get("FABRIC_TORCH_INDEX") or pip_find_links(environment, python)


def pip_arguments(env: Mapping[str, str] | None = None, python: str = sys.executable) -> list[str]:
    """pip's arguments for installing the CPU torch (or FABRIC_TORCH_INDEX's) here."""
    source = torch_source(env, python) or CPU_TORCH_INDEX
    return ["--find-links", source] if Path(source).is_dir() else ["--index-url", source]


if __name__ == "__main__":
    print(shlex.join(pip_arguments()))
