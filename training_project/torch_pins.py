"""The torch a node installs for a project, and the check that the torch family members the
project names go with it: what the project's dependency file asks for, read with packaging.
The user's machine only (at synth, in the local cluster, in the rehearsal): a node is told the
torch version, and its install step never imports this module.
"""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from training_project.dependencies import (
    dependency_file,
    locked_packages,
    pyproject_dependencies,
    requirement_name,
    requirements_file_lines,
)
from training_project.errors import DependencyError
from training_project.torch_family import TORCH_FAMILY, family_version

NODE_REQUIREMENTS = Path(__file__).resolve().parent.parent / "userdata" / "requirements-node.txt"


def pinned_version(package: str, requirements: Path = NODE_REQUIREMENTS) -> str:
    """The version pinned with == for a package in a requirements file."""
    for line in requirements.read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}==([^\s#;]+)", line.strip())
        if match:
            return match.group(1)
    raise ValueError(f"{requirements} does not pin {package}==VERSION")


def requirement_specifiers(project: Path, package: str) -> list[str]:
    """What the project's dependency file says about a package (a lock: its exact version)."""
    source = dependency_file(project)
    if source is None:
        return []
    if source.name == "uv.lock":
        version = locked_packages(source).get(package)
        return [f"=={version}"] if version else []
    if source.name == "pyproject.toml":
        lines = pyproject_dependencies(source)
    else:
        lines = requirements_file_lines(source)
    specifiers = []
    for line in lines:
        if requirement_name(line) != package:
            continue
        try:
            requirement = Requirement(line.split("#", 1)[0].strip().split(" --", 1)[0])
        except InvalidRequirement as error:
            raise DependencyError(
                f"{source.name}: {line.strip()!r} does not parse: {error}"
            ) from None
        if requirement.url:
            raise DependencyError(
                f"{source.name}: {package} from a URL cannot be used: a node installs its "
                "accelerator's build (name a version instead)"
            )
        specifiers.append(str(requirement.specifier))
    return specifiers


def torch_specifiers(project: Path) -> list[str]:
    """What the project's dependency file says about torch (a lock: its exact version)."""
    return requirement_specifiers(project, "torch")


def _public(specifiers: list[str]) -> SpecifierSet:
    """The specifiers with no local label (==2.5.1+cu121 is ==2.5.1): the build is the node's
    choice, not the project's."""
    return SpecifierSet(",".join(re.sub(r"\+[\w.]*", "", s) for s in specifiers if s))


def check_torch_family(project: Path, torch_version: str) -> None:
    """Each family member the project names allows the version that goes with the nodes'
    torch: a node installs that one, whatever the project pins."""
    for package in TORCH_FAMILY:
        specifiers = requirement_specifiers(project, package)
        if not specifiers:
            continue
        wanted = _public(specifiers)
        version = family_version(package, torch_version)
        if wanted.contains(version, prereleases=True):
            continue
        exact = len(wanted) == 1 and next(iter(wanted)).operator in ("==", "===")
        asks, fix = ("pins", "pin") if exact else ("asks for", "allow")
        raise DependencyError(
            f"it {asks} {package}{wanted}, but the nodes' torch {torch_version} goes with "
            f"{package} {version}: {fix} that version or leave it out"
        )


def node_torch_version(specifiers: list[str], pinned: str) -> str:
    """The torch a node installs: an exact pin wins; else the pinned one, if the project's
    range allows it; else there is no torch both agree on."""
    wanted = SpecifierSet(",".join(s for s in specifiers if s))
    exact = [s.version for s in wanted if s.operator in ("==", "===") and "*" not in s.version]
    if exact:
        try:
            return Version(exact[0]).public  # +cpu or +cu121 is the node's choice, not the lock's
        except InvalidVersion:
            raise DependencyError(f"torch=={exact[0]} is not a version") from None
    if wanted.contains(pinned, prereleases=True):
        return pinned
    raise DependencyError(
        f"it asks for torch{wanted}, which the nodes' torch {pinned} does not satisfy: allow "
        f"{pinned}, or pin an exact version (torch==X) to get that one"
    )
