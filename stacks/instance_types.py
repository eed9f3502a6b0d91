"""What the stack needs to know about EC2 instance types: GPUs per type, EFA support, placement.

Only NVIDIA GPU types on x86_64 (the node AMIs are amd64). From AWS's instance type pages
(accelerated computing; "Elastic Fabric Adapter" support).
"""

from __future__ import annotations

import re

_ONE_TO_FOUR_EIGHT = {
    "xlarge": 1,
    "2xlarge": 1,
    "4xlarge": 1,
    "8xlarge": 1,
    "16xlarge": 1,
    "12xlarge": 4,
    "24xlarge": 4,
    "48xlarge": 8,
}
GPUS_PER_TYPE: dict[str, int] = {
    **{f"g5.{size}": n for size, n in _ONE_TO_FOUR_EIGHT.items()},
    **{f"g6.{size}": n for size, n in _ONE_TO_FOUR_EIGHT.items()},
    **{f"g6e.{size}": n for size, n in _ONE_TO_FOUR_EIGHT.items()},
    "g4dn.xlarge": 1,
    "g4dn.2xlarge": 1,
    "g4dn.4xlarge": 1,
    "g4dn.8xlarge": 1,
    "g4dn.16xlarge": 1,
    "g4dn.12xlarge": 4,
    "g4dn.metal": 8,
    "gr6.4xlarge": 1,
    "gr6.8xlarge": 1,
    "p3.2xlarge": 1,
    "p3.8xlarge": 4,
    "p3.16xlarge": 8,
    "p3dn.24xlarge": 8,
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.4xlarge": 1,
    "p5.48xlarge": 8,
    "p5e.48xlarge": 8,
    "p5en.48xlarge": 8,
}
GPU_FAMILIES = frozenset(name.split(".", 1)[0] for name in GPUS_PER_TYPE)

_EFA_SIZES = ("8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")
EFA_TYPES = frozenset(
    {f"{family}.{size}" for family in ("g5", "g6", "g6e") for size in _EFA_SIZES}
    | {
        "g4dn.8xlarge",
        "g4dn.12xlarge",
        "g4dn.16xlarge",
        "g4dn.metal",
        "gr6.8xlarge",
        "p3dn.24xlarge",
        "p4d.24xlarge",
        "p4de.24xlarge",
        "p5.48xlarge",
        "p5e.48xlarge",
        "p5en.48xlarge",
    }
)

# Burstable and Mac families cannot join a cluster placement group.
_NO_PLACEMENT_GROUP = re.compile(r"^(t\d+[a-z]*|mac\d*[a-z0-9-]*)$")


def family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def supports_cluster_placement_group(instance_type: str) -> bool:
    return not _NO_PLACEMENT_GROUP.match(family(instance_type))
