"""What a script writes by relative path into its working directory (lightning_logs/, a
TensorBoardLogger's logs/, checkpoints/, wandb/ offline runs): the project folder on node 0,
the staged copy in the local cluster. Kept with the run under outputs/ (S3: the run's prefix;
locally: the run folder), like $FABRIC_RUN_DIR, so that it does not die with the node.

Kept: files new or changed since the script started (what shipped and is unchanged is the
project, not an output). Left out: caches and virtualenvs, files still being written (a
temporary name), symbolic links, any file over MAX_OUTPUT_FILE_BYTES, and whatever would take
the outputs past MAX_OUTPUTS_BYTES (the smaller files first). Each left-out file is said once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

OUTPUTS = "outputs"  # the folder of the run (and key prefix in S3) they are kept under
MAX_OUTPUT_FILE_BYTES = 2 << 30  # 2 GiB: a bigger file is data or a mistake, not an output
MAX_OUTPUTS_BYTES = 5 << 30  # 5 GiB in all
SKIPPED_DIRS = frozenset(
    {".git", ".hg", ".svn", "__pycache__", "node_modules", ".pytest_cache", ".mypy_cache",
     ".ruff_cache", ".ipynb_checkpoints", ".cache"}
)  # fmt: skip
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".partial", ".tmp")

Snapshot = dict[str, tuple[int, int]]  # relative POSIX path -> (size, mtime_ns)


def _walk(workdir: Path) -> list[tuple[str, os.stat_result]]:
    found = []
    for folder, dirs, files in os.walk(workdir):
        # A virtualenv, whatever its name, is not an output; neither are caches.
        dirs[:] = [
            d for d in dirs
            if d not in SKIPPED_DIRS and not (Path(folder, d) / "pyvenv.cfg").is_file()
        ]  # fmt: skip
        for name in files:
            path = Path(folder, name)
            if name.endswith(SKIPPED_SUFFIXES) or ".tmp" in name or path.is_symlink():
                continue
            try:
                found.append((path.relative_to(workdir).as_posix(), path.stat()))
            except OSError:
                continue  # gone between the listing and the look
    return sorted(found)


def snapshot(workdir: Path) -> Snapshot:
    """The working directory as the script found it: taken just before it starts."""
    return {relative: (stat.st_size, stat.st_mtime_ns) for relative, stat in _walk(workdir)}


@dataclass
class Outputs:
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path (why)"


def outputs(workdir: Path, before: Snapshot) -> Outputs:
    """The files the script created or changed since `before`, within the limits."""
    found = Outputs()
    candidates = [
        (stat.st_size, relative)
        for relative, stat in _walk(workdir)
        if before.get(relative) != (stat.st_size, stat.st_mtime_ns)
    ]
    total = 0
    for size, relative in sorted(candidates):
        if size > MAX_OUTPUT_FILE_BYTES:
            found.skipped.append(
                f"{relative} ({size >> 20} MiB, over {MAX_OUTPUT_FILE_BYTES >> 30} GiB)"
            )
        elif total + size > MAX_OUTPUTS_BYTES:
            found.skipped.append(f"{relative} (outputs over {MAX_OUTPUTS_BYTES >> 30} GiB in all)")
        else:
            total += size
            found.files.append(workdir / relative)
    found.files.sort()
    return found
