"""A project's dependencies as a node installs them: which file declares them, and the one
requirements list that install.sh hands to uv (the project's, then the agent's own needs).

    python -m training_project.dependencies --project DIR --agent-requirements FILE --uv UV \
        [--torch-version 2.13.0 --family-pins FILE --family-named FILE]

The node's install step (userdata/install.sh runs it). Standard library only, as are the
modules it imports (torch_family.py, errors.py): it runs on a node before anything but boto3 is
installed, and on the user's machine for the local cluster. torch and its family (TORCH_FAMILY)
are never in the list: install.sh installs the accelerator's build of them first, from torch's
source, and holds them with constraints, whatever the project names. --family-pins gets the
family's versions for that torch (name==version, one a line), --family-named those of them the
project names.
An installable project (a package) is in the list itself, as `.` (install.sh installs from the
project folder): not editable, so its modules import from any working directory.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

from training_project.errors import DependencyError
from training_project.torch_family import TORCH_FAMILY, family_version, family_versions

# In this order: the first one a project has is what it declares (as uv and pip users expect).
DEPENDENCY_FILES = ("uv.lock", "pyproject.toml", "requirements.txt")
# A project line that already installs the project itself.
_SELF = frozenset({".", "./", "-e .", "-e ./", "--editable .", "--editable ./"})
_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


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


def installable(project: Path) -> bool:
    """A package (uv's rule): [tool.uv] package = true, or a [build-system] table unless
    package = false. Anything else is a folder of scripts, run where it lies."""
    path = project / "pyproject.toml"
    if not path.is_file():
        return False
    data = read_toml(path)
    tool = data.get("tool")
    uv = tool.get("uv") if isinstance(tool, dict) else None
    package = uv.get("package") if isinstance(uv, dict) else None
    if isinstance(package, bool):
        return package
    return isinstance(data.get("build-system"), dict)


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


def declared_requirements(project: Path, uv: str) -> list[str]:
    """The requirement lines of the project's dependency file as they are (none without one)."""
    source = dependency_file(project)
    if source is None:
        return []
    if source.name == "uv.lock":
        return locked_requirements(project, uv)
    if source.name == "pyproject.toml":
        return pyproject_dependencies(source)
    return requirements_file_lines(source)


def held_by_node(name: str | None) -> bool:
    """torch and its family: install.sh installs and holds the node's build of them."""
    return name == "torch" or name in TORCH_FAMILY


def project_requirements(project: Path, uv: str, declared: list[str] | None = None) -> list[str]:
    """Requirement lines for the project's own dependencies, without torch and its family
    (install.sh holds the node's builds, whatever version or label a pin names), then the
    project itself when it is installable."""
    if declared is None:
        declared = declared_requirements(project, uv)
    lines = [line for line in declared if not held_by_node(requirement_name(line))]
    if installable(project) and not any(" ".join(line.split()) in _SELF for line in lines):
        lines.append(".")
    return lines


def named_family(declared: Iterable[str]) -> list[str]:
    """The torch family members that the project's lines name (for a lock: that it locks)."""
    named = named_in(declared)
    return [name for name in TORCH_FAMILY if name in named]


def named_in(lines: Iterable[str]) -> set[str]:
    return {name for line in lines if (name := requirement_name(line))}


def node_requirements(
    project: Path, agent_requirements: Path, uv: str, declared: list[str] | None = None
) -> list[str]:
    """The project's requirements, then the agent's needs that the project does not name
    itself (a project that pins its own lightning gets it)."""
    wanted = project_requirements(project, uv, declared)
    named = named_in(wanted)
    agent = [
        line.strip()
        for line in agent_requirements.read_text(encoding="utf-8").splitlines()
        if (name := requirement_name(line)) and name not in named and not held_by_node(name)
    ]
    return [*wanted, *agent]


def write_family(
    torch_version: str, declared: list[str], pins_file: Path, named_file: Path
) -> None:
    """install.sh's view of the family for this torch: every member's pin (its constraints
    and check), and the pins of those the project names (installed with torch)."""
    named = [f"{name}=={family_version(name, torch_version)}\n" for name in named_family(declared)]
    versions = family_versions(torch_version)
    pins_file.write_text("".join(f"{name}=={version}\n" for name, version in versions.items()))
    named_file.write_text("".join(named))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training_project.dependencies", description=__doc__
    )
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--agent-requirements", type=Path, required=True)
    parser.add_argument("--uv", default="uv")
    parser.add_argument("--torch-version", help="the node's torch, for --family-pins/-named")
    parser.add_argument("--family-pins", type=Path, help="written: the family's pins")
    parser.add_argument("--family-named", type=Path, help="written: those the project names")
    args = parser.parse_args(argv)
    family = (args.torch_version, args.family_pins, args.family_named)
    if any(family) and not all(family):
        parser.error("--torch-version, --family-pins and --family-named go together")
    try:
        declared = declared_requirements(args.project, args.uv)
        lines = node_requirements(args.project, args.agent_requirements, args.uv, declared)
        if args.torch_version:
            write_family(args.torch_version, declared, args.family_pins, args.family_named)
    except (DependencyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
