"""The user's training project, checked on the user's machine (at synth and by the local cluster):
the folder, the script inside it (a file, or `-m pkg.module`), its dependency file, the torch a
node installs for it (and the torch family's versions that go with it), and the files that ship.

A bad project raises ConfigError with one line naming the setting (project or script).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from pathspec import GitIgnoreSpec

from stacks.errors import ConfigError
from userdata.dependencies import (
    DEPENDENCY_FILES,
    TORCH_FAMILY,
    DependencyError,
    dependency_file,
    family_version,
    installable,
    locked_packages,
    normalized,
    pyproject_dependencies,
    requirement_name,
    requirements_file_lines,
)

NODE_REQUIREMENTS = Path(__file__).resolve().parent.parent / "userdata" / "requirements-node.txt"
MAX_PROJECT_BYTES = 500 * 1024 * 1024
# Never shipped, wherever they are: version control, caches and the CDK's own output.
NEVER_SHIPPED = frozenset(
    {".git", ".hg", ".svn", "__pycache__", "node_modules", "cdk.out", ".pytest_cache",
     ".mypy_cache", ".ruff_cache", ".hypothesis", ".ipynb_checkpoints", ".DS_Store"}
)  # fmt: skip
# Only at the project's top: the local cluster's runs (a package may be called runs).
NEVER_SHIPPED_AT_TOP = frozenset({"runs"})
NEVER_SHIPPED_SUFFIXES = (".pyc", ".pyo")
# `-m pkg.module`: what `python -m` takes, a dotted name of identifiers.
_MODULE_SCRIPT = re.compile(r"-m\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", re.ASCII)


@dataclass(frozen=True)
class Project:
    path: Path  # absolute
    script: str  # relative to path, POSIX; or "-m pkg.module"
    dependency_file: str | None  # uv.lock, pyproject.toml, requirements.txt or None
    torch_version: str  # what a node installs (the accelerator's build of it)


def pinned_version(package: str, requirements: Path = NODE_REQUIREMENTS) -> str:
    """The version pinned with == for a package in a requirements file."""
    for line in requirements.read_text().splitlines():
        match = re.match(rf"^{re.escape(package)}==([^\s#;]+)", line.strip())
        if match:
            return match.group(1)
    raise ValueError(f"{requirements} does not pin {package}==VERSION")


def _invalid(key: str, value: object, problem: str) -> ConfigError:
    return ConfigError(f"invalid setting {key}={value!r}: {problem}")


def project_folder(value: object, app_dir: Path) -> Path:
    """An existing folder, absolute or relative to the CDK app, holding at least one .py file."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid("project", value, "expected a folder (absolute, or relative to the app)")
    try:
        path = (app_dir / value.strip()).resolve()
        exists = path.is_dir()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise _invalid("project", value, f"no such folder ({str(app_dir / str(value).strip())!r})")
    try:
        has_code = any(f.suffix == ".py" for f in _walk(path))  # stops at the first one
    except OSError as error:  # an unreadable folder inside it
        raise _invalid("project", value, f"cannot be read: {error}") from None
    if not has_code:
        raise _invalid("project", value, f"{path} holds no Python file that would ship")
    return path


def project_script(value: object, project: Path) -> str:
    """A shipped file inside the project (its relative path), or `-m pkg.module` for a module
    shipped in it (pkg/module.py or pkg/module/__main__.py, at the top or under src/)."""
    allowed = (
        f"expected the relative path of a file inside the project ({project}), or -m followed "
        "by a module shipped in it (pkg/module.py or pkg/module/__main__.py, or under src/)"
    )
    if not isinstance(value, str) or not value.strip() or Path(value.strip()).is_absolute():
        raise _invalid("script", value, allowed)
    if value.strip().startswith("-"):
        return _module_script(value, project, allowed)
    try:
        path = (project / value.strip()).resolve()
        usable = path.is_relative_to(project) and path.is_file()
    except (OSError, ValueError):  # e.g. a NUL byte in the path
        usable = False
    if not usable:
        raise _invalid("script", value, allowed)
    relative = path.relative_to(project)
    if not _ships(project, relative):
        raise _invalid("script", value, "it would not ship (ignored by .gitignore or a cache)")
    return relative.as_posix()


def _module_script(value: str, project: Path, allowed: str) -> str:
    match = _MODULE_SCRIPT.fullmatch(value.strip())
    if not match:
        raise _invalid("script", value, allowed)
    module = match.group(1)
    parts = module.split(".")
    candidates = [
        path
        for base in ("", "src")
        for path in (Path(base, *parts[:-1], parts[-1] + ".py"), Path(base, *parts, "__main__.py"))
    ]
    shipped = set(shipped_files(project))
    if not any(candidate in shipped for candidate in candidates):
        listed = ", ".join(candidate.as_posix() for candidate in candidates)
        raise _invalid("script", value, f"no shipped file is module {module} ({listed}); {allowed}")
    return f"-m {module}"


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


def load_project(project: object, script: object, app_dir: Path, pinned_torch: str) -> Project:
    path = project_folder(project, app_dir)
    relative_script = project_script(script, path)
    source = dependency_file(path)
    try:
        torch_version = node_torch_version(torch_specifiers(path), pinned_torch)
        check_torch_family(path, torch_version)
        installable(path)  # a pyproject.toml that cannot be read says so here, not on a node
    except DependencyError as error:
        raise _invalid("project", project, str(error)) from None
    return Project(path, relative_script, source.name if source else None, torch_version)


def _gitignores(project: Path, folder: Path) -> list[tuple[Path, GitIgnoreSpec]]:
    ignore_file = folder / ".gitignore"
    if not ignore_file.is_file():
        return []
    lines = ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
    return [(folder.relative_to(project), GitIgnoreSpec.from_lines(lines))]


def _ignored(relative: Path, is_dir: bool, specs: list[tuple[Path, GitIgnoreSpec]]) -> bool:
    for base, spec in specs:
        inside = relative.relative_to(base).as_posix() if base.parts else relative.as_posix()
        if spec.match_file(inside + ("/" if is_dir else "")):
            return True
    return False


def _never_shipped(relative: Path, is_dir: bool, folder: Path) -> bool:
    name = relative.name
    if name in NEVER_SHIPPED or name.endswith(NEVER_SHIPPED_SUFFIXES):
        return True
    if len(relative.parts) == 1 and name in NEVER_SHIPPED_AT_TOP:
        return True
    # A virtualenv, whatever its name.
    return is_dir and (folder / "pyvenv.cfg").is_file()


def _walk(project: Path) -> Iterator[Path]:
    """Every shipped file, relative to the project, in a stable order."""
    stack: list[tuple[Path, list[tuple[Path, GitIgnoreSpec]]]] = [(project, [])]
    while stack:
        folder, inherited = stack.pop()
        specs = inherited + _gitignores(project, folder)
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):
                path = Path(entry.path)
                relative = path.relative_to(project)
                is_dir = entry.is_dir(follow_symlinks=False)
                if _never_shipped(relative, is_dir, path) or _ignored(relative, is_dir, specs):
                    continue
                if is_dir:
                    stack.append((path, specs))
                elif entry.is_file():
                    yield relative


def shipped_files(project: Path) -> list[Path]:
    """What ships; the dependency files always do (the node installs from them)."""
    files = set(_walk(project))
    files |= {Path(name) for name in DEPENDENCY_FILES if (project / name).is_file()}
    return sorted(files)


def _ships(project: Path, relative: Path) -> bool:
    return relative in set(shipped_files(project))


def check_size(project: Path, files: list[Path], limit: int = MAX_PROJECT_BYTES) -> None:
    sizes = {relative: (project / relative).stat().st_size for relative in files}
    total = sum(sizes.values())
    if total <= limit:
        return
    biggest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:3]
    listed = ", ".join(f"{path.as_posix()} ({sizes[path] / 1e6:.0f} MB)" for path in biggest)
    raise _invalid(
        "project",
        str(project),
        f"{total / 1e6:.0f} MB would ship, over the {limit / 1e6:.0f} MB limit (biggest: "
        f"{listed}); keep data out of the project (.gitignore it) and pass it with "
        "--data s3://...",
    )


__all__ = ["DependencyError", "Project", "load_project", "normalized", "shipped_files"]
