"""A project's dependencies as a node installs them: which file declares them, and the one
requirements list that install.sh hands to uv (the project's, then the agent's own needs).

    python -m userdata.dependencies --project DIR --agent-requirements FILE --uv UV

Standard library only: it runs on a node before anything but boto3 is installed, and on the
user's machine for the local cluster. torch is never in the list: install.sh installs the
accelerator's build first and holds it with a constraint, whatever the project names.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

# In this order: the first one a project has is what it declares (as uv and pip users expect).
DEPENDENCY_FILES = ("uv.lock", "pyproject.toml", "requirements.txt")
_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


class DependencyError(ValueError):
    """A dependency file that cannot be used; the message is one line."""


def normalized(name: str) -> str:
    """PEP 503: names compare case-insensitively, with runs of -_. alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    """The distribution a requirement line names; None for options, comments and blanks."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = _NAME.match(text)
    return normalized(match.group(1)) if match else None


def declares_dependencies(pyproject: Path) -> bool:
    """A pyproject.toml only for tools ([tool.ruff], Poetry's own table) or with dynamic
    dependencies declares none here: the next file (requirements.txt) does."""
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return True  # and reading it says what is wrong
    return isinstance(project, dict) and "dependencies" not in project.get("dynamic", [])


def dependency_file(project: Path) -> Path | None:
    for name in DEPENDENCY_FILES:
        path = project / name
        if path.is_file() and (name != "pyproject.toml" or declares_dependencies(path)):
            return path
    return None


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise DependencyError(f"{path.name} cannot be read: {error}") from None


def pyproject_dependencies(path: Path) -> list[str]:
    """[project].dependencies: what `pip install .` would install, without the project itself."""
    dependencies = read_toml(path).get("project", {}).get("dependencies", [])
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise DependencyError(f"{path.name}: [project].dependencies must be a list of strings")
    return dependencies


def locked_packages(path: Path) -> dict[str, str]:
    """uv.lock's packages and their versions."""
    packages = read_toml(path).get("package")
    if not isinstance(packages, list):
        raise DependencyError(f"{path.name} cannot be read: it has no [[package]] entries")
    return {
        normalized(str(package.get("name", ""))): str(package.get("version", ""))
        for package in packages
        if isinstance(package, dict)
    }


def locked_requirements(project: Path, uv: str) -> list[str]:
    """The lock exactly as locked, less torch and what only torch needs (its CUDA wheels)."""
    command = [
        uv, "export", "--frozen", "--no-hashes", "--no-header", "--no-annotate",
        "--no-emit-project", "--format", "requirements-txt", "--prune", "torch",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=project, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise DependencyError(f"uv.lock cannot be exported: {message}")
    # Workspace members and path dependencies come as "-e ./x" or "./x": they install too.
    lines = result.stdout.splitlines()
    return [line for line in lines if requirement_name(line) or line.startswith(("-e ", "./"))]


_INCLUDE = re.compile(r"^(?:-r|--requirement)(?:\s*=\s*|\s+|(?=\S))(\S+)")


def requirements_file_lines(path: Path, seen: frozenset[Path] = frozenset()) -> list[str]:
    """A requirements file's lines with the files it includes (-r) inlined, each once."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DependencyError(f"{path.name} cannot be read: {error}") from None
    lines: list[str] = []
    for line in text.splitlines():
        include = _INCLUDE.match(line.strip())
        if include:
            included = (path.parent / include.group(1)).resolve()
            if included not in seen:
                lines += requirements_file_lines(included, seen | {path.resolve()})
        elif line.split("#", 1)[0].strip():
            lines.append(line.strip())
    return lines


def project_requirements(project: Path, uv: str) -> list[str]:
    """Requirement lines for the project's own dependencies (none without a dependency file),
    without torch: install.sh holds the node's torch, whatever build label a pin names."""
    source = dependency_file(project)
    if source is None:
        return []
    if source.name == "uv.lock":
        lines = locked_requirements(project, uv)
    elif source.name == "pyproject.toml":
        lines = pyproject_dependencies(source)
    else:
        lines = requirements_file_lines(source)
    return [line for line in lines if requirement_name(line) != "torch"]


def named_in(lines: Iterable[str]) -> set[str]:
    return {name for line in lines if (name := requirement_name(line))}


def node_requirements(project: Path, agent_requirements: Path, uv: str) -> list[str]:
    """The project's requirements, then the agent's needs that the project does not name
    itself (a project that pins its own lightning gets it)."""
    wanted = project_requirements(project, uv)
    named = named_in(wanted)
    agent = [
        line.strip()
        for line in agent_requirements.read_text(encoding="utf-8").splitlines()
        if (name := requirement_name(line)) and name not in named and name != "torch"
    ]
    return [*wanted, *agent]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m userdata.dependencies", description=__doc__)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--agent-requirements", type=Path, required=True)
    parser.add_argument("--uv", default="uv")
    args = parser.parse_args(argv)
    try:
        lines = node_requirements(args.project, args.agent_requirements, args.uv)
    except (DependencyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
