"""The run a deploy trains: named by the run setting, or after what the nodes run."""

from __future__ import annotations

import hashlib
import json

from stacks.config import ClusterConfig
from training_project.shipping import shipped_files


def project_fingerprint(config: ClusterConfig) -> str:
    """sha256 of the project's shipped files (paths and contents): the code a run trains."""
    digest = hashlib.sha256()
    for relative in shipped_files(config.project):
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update((config.project / relative).read_bytes() + b"\0")
    return digest.hexdigest()


def run_fingerprint(config: ClusterConfig) -> str:
    """What the nodes train: the project's code, the script and the world. Not its arguments:
    a run continued without them trains with the ones it recorded (the node agent compares
    those itself). Instance type, spot and the like change where a run trains, not what."""
    what = {
        "project": project_fingerprint(config),
        "script": config.script,
        "num_nodes": config.num_nodes,
        "devices_per_node": config.devices_per_node,
        "accelerator": config.accelerator,
        "precision": config.precision,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def run_name(config: ClusterConfig) -> str:
    """The same project and training settings: the same run, which a new cluster continues;
    a change of code, arguments, data channels or world size: a new run beside the old ones
    (variables and secrets are not what it trains on: a new key continues the run)."""
    if config.run:
        return config.run
    what: dict[str, object] = {
        "training": run_fingerprint(config),
        "script_args": list(config.script_args),
    }
    if config.inputs.data:  # as a --data in script_args would; no data: the names as before
        what["data"] = [[channel.name, channel.uri] for channel in config.inputs.data]
    return "run-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
