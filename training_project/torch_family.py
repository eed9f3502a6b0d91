"""The torch family rule: which torchvision and torchaudio go with a torch.

Standard library only: the node's install step (dependencies.py) uses it in a venv that holds
nothing yet; on the user's machine, torch_pins.py checks a project's pins against it.
"""

from __future__ import annotations

import re

from training_project.errors import DependencyError

# Released with torch, one version for each torch version, and built per accelerator like torch
# (PyPI's Linux torchvision carries CUDA libraries): a node takes them from torch's source.
TORCH_FAMILY = ("torchvision", "torchaudio")
# torch 2.0.x came out with other versions than the rule of family_versions gives.
_FAMILY_RELEASES = {
    "2.0.0": {"torchvision": "0.15.1", "torchaudio": "2.0.1"},
    "2.0.1": {"torchvision": "0.15.2", "torchaudio": "2.0.2"},
}


def family_versions(torch_version: str) -> dict[str, str]:
    """The torch family's versions released with a torch 2.x (local label ignored): torchvision
    0.(minor+15).patch, torchaudio torch's own version; none known for another torch."""
    public = torch_version.split("+", 1)[0]
    if public in _FAMILY_RELEASES:
        return dict(_FAMILY_RELEASES[public])
    match = re.fullmatch(r"2\.(\d+)\.(\d+)", public)
    if not match:
        return {}
    minor, patch = (int(part) for part in match.groups())
    return {"torchvision": f"0.{minor + 15}.{patch}", "torchaudio": public}


def family_version(package: str, torch_version: str) -> str:
    """The version of a family member that goes with the nodes' torch."""
    version = family_versions(torch_version).get(package)
    if version is None:
        raise DependencyError(
            f"it names {package}, but no {package} is known to go with the nodes' torch "
            f"{torch_version} (only torch 2.x): leave it out or pin torch 2.x"
        )
    return version
