"""A user's training project as the stack, the local cluster and the rehearsal take it: the
folder, the script inside it (a file, or `-m pkg.module`), its dependency file and the torch a
node installs for it, checked as a whole by load_project. The user's machine only (through
torch_pins.py and shipping.py, it needs packaging and pathspec).

A bad project raises ProjectError with one line naming the setting (project or script).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from training_project.dependencies import dependency_file, installable
from training_project.errors import DependencyError, invalid
from training_project.shipping import _ships, _walk, shipped_files
from training_project.torch_pins import check_torch_family, node_torch_version, torch_specifiers

# `-m pkg.module`: what `python -m` takes, a dotted name of identifiers.
_MODULE_SCRIPT = re.compile(r"-m\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)", re.ASCII)


@dataclass(frozen=True)
class Project:
    path: Path  # absolute
    script: str  # relative to path, POSIX; or "-m pkg.module"
    dependency_file: str | None  # uv.lock, pyproject.toml, requirements.txt or None
    torch_version: str  # what a node installs (the accelerator's build of it)


def project_folder(value: object, app_dir: Path) -> Path:
    """An existing folder, absolute or relative to the CDK app, holding at least one .py file."""
    if not isinstance(value, str) or not value.strip():
        raise invalid("project", value, "expected a folder (absolute, or relative to the app)")
    try:
        path = (app_dir / value.strip()).resolve()
        exists = path.is_dir()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise invalid("project", value, f"no such folder ({str(app_dir / str(value).strip())!r})")
    try:
        has_code = any(f.suffix == ".py" for f in _walk(path))  # stops at the first one
    except OSError as error:  # an unreadable folder inside it
        raise invalid("project", value, f"cannot be read: {error}") from None
    if not has_code:
        raise invalid("project", value, f"{path} holds no Python file that would ship")
    return path


def project_script(value: object, project: Path) -> str:
    """A shipped file inside the project (its relative path), or `-m pkg.module` for a module
    shipped in it (pkg/module.py or pkg/module/__main__.py, at the top or under src/)."""
    allowed = (
        f"expected the relative path of a file inside the project ({project}), or -m followed "
        "by a module shipped in it (pkg/module.py or pkg/module/__main__.py, or under src/)"
    )
    if not isinstance(value, str) or not value.strip() or Path(value.strip()).is_absolute():
        raise invalid("script", value, allowed)
    if value.strip().startswith("-"):
        return _module_script(value, project, allowed)
    try:
        path = (project / value.strip()).resolve()
        usable = path.is_relative_to(project) and path.is_file()
    except (OSError, ValueError):  # e.g. a NUL byte in the path
        usable = False
    if not usable:
        raise invalid("script", value, allowed)
    relative = path.relative_to(project)
    if not _ships(project, relative):
        raise invalid("script", value, "it would not ship (ignored by .gitignore or a cache)")
    return relative.as_posix()


def _module_script(value: str, project: Path, allowed: str) -> str:
    match = _MODULE_SCRIPT.fullmatch(value.strip())
    if not match:
        raise invalid("script", value, allowed)
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
        raise invalid("script", value, f"no shipped file is module {module} ({listed}); {allowed}")
    return f"-m {module}"


def load_project(project: object, script: object, app_dir: Path, pinned_torch: str) -> Project:
    path = project_folder(project, app_dir)
    relative_script = project_script(script, path)
    source = dependency_file(path)
    try:
        torch_version = node_torch_version(torch_specifiers(path), pinned_torch)
        check_torch_family(path, torch_version)
        installable(path)  # a pyproject.toml that cannot be read says so here, not on a node
    except DependencyError as error:
        raise invalid("project", project, str(error)) from None
    return Project(path, relative_script, source.name if source else None, torch_version)
