"""The run a deploy trains: named by the run setting, or after what the nodes run."""

from __future__ import annotations

import hashlib
import json

from stacks.config import ClusterConfig
from stacks.project import shipped_files


def project_fingerprint(config: ClusterConfig) -> str:
    """sha256 of the project's shipped files (paths and contents): the code a run trains."""
    digest = hashlib.sha256()
    for relative in shipped_files(config.project):
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update((config.project / relative).read_bytes() + b"\0")
    return digest.hexdigest()


def run_fingerprint(config: ClusterConfig) -> str:
    """What the nodes train: the project's code, the script, its arguments and the world.
    Instance type, spot and the like are not part of it: they change where a run trains."""
    what = {
        "project": project_fingerprint(config),
        "script": config.script,
        "script_args": list(config.script_args),
        "num_nodes": config.num_nodes,
        "devices_per_node": config.devices_per_node,
        "accelerator": config.accelerator,
        "precision": config.precision,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def run_name(config: ClusterConfig) -> str:
    """The same project and training settings: the same run, which a new cluster continues;
    a change of code, arguments or world size: a new run beside the old ones."""
    return config.run or "run-" + run_fingerprint(config)[:12]
