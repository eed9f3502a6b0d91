"""The files of a project that ship (to every node, in the payload; to the local cluster's
staged copy): none that .gitignore, a cache, a venv or version control holds, and the dependency
files always. Reads .gitignore with pathspec: the user's machine only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pathspec import GitIgnoreSpec

from training_project.dependencies import DEPENDENCY_FILES
from training_project.errors import invalid

MAX_PROJECT_BYTES = 500 * 1024 * 1024
# Never shipped, wherever they are: version control, caches and the CDK's own output.
NEVER_SHIPPED = frozenset(
    {".git", ".hg", ".svn", "__pycache__", "node_modules", "cdk.out", ".pytest_cache",
     ".mypy_cache", ".ruff_cache", ".hypothesis", ".ipynb_checkpoints", ".DS_Store"}
)  # fmt: skip
# Only at the project's top: the local cluster's runs (a package may be called runs).
NEVER_SHIPPED_AT_TOP = frozenset({"runs"})
NEVER_SHIPPED_SUFFIXES = (".pyc", ".pyo")


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
    raise invalid(
        "project",
        str(project),
        f"{total / 1e6:.0f} MB would ship, over the {limit / 1e6:.0f} MB limit (biggest: "
        f"{listed}); keep data out of the project (.gitignore it) and pass it with "
        "--data s3://...",
    )
