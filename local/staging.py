"""The local cluster runs what ships: a staged copy of the project's shipped files (the same
list the payload asset holds, training_project/shipping.shipped_files), so that a file the
script needs but that does not ship (a .gitignore'd config) fails here as it would on every
node. What the script writes into that copy is kept in the run folder's outputs/, as node 0
keeps it in S3."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from training_project.shipping import shipped_files
from userdata.outputs import OUTPUTS, Snapshot, outputs, snapshot


def copy_shipped(project: Path, into: Path) -> int:
    """A copy of what ships of the project (what a node's payload holds); the file count.
    A copy, never a link: a script that writes a shipped file must not change the user's own.
    Small (the asset's limit is 500 MB): data comes from elsewhere."""
    shutil.rmtree(into, ignore_errors=True)
    files = shipped_files(project)
    for relative in files:
        (into / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / relative, into / relative)
    return len(files)


class Stage:
    """A fresh copy of the project's shipped files in a temporary folder, removed by close()."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self.root = Path(tempfile.mkdtemp(prefix="fabric-stage-"))
        self.path = self.root / project.name
        self.files = copy_shipped(project, self.path)
        self.before: Snapshot = snapshot(self.path)

    def keep_outputs(self, run_dir: Path) -> list[str]:
        """Copies what the script created or changed into run_dir/outputs/; returns what
        was left out (userdata/outputs.py's limits), as 'path (why)'."""
        found = outputs(self.path, self.before)
        for path in found.files:
            target = run_dir / OUTPUTS / path.relative_to(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return found.skipped

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
