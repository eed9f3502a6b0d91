"""What the stack needs to know about EC2 instance types: GPUs, EFA, placement, bf16, disks.

Only NVIDIA GPU types on x86_64 (the node AMIs are amd64), and only GPUs that the pinned torch
(CUDA 13 wheels: sm_75 and newer) and the Deep Learning AMI's open kernel modules (Turing and
newer) support: no p3/p3dn (V100, Volta). From AWS's instance type pages (accelerated
computing; "Elastic Fabric Adapter" support; network cards).
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
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.4xlarge": 1,
    "p5.48xlarge": 8,
    "p5e.48xlarge": 8,
    "p5en.48xlarge": 8,
}
# The GPU of each family, and whether it computes in bfloat16 (compute capability 8.0+).
GPU_MODEL = {
    "g4dn": ("T4", False),
    "g5": ("A10G", True),
    "g6": ("L4", True),
    "g6e": ("L40S", True),
    "gr6": ("L4", True),
    "p4d": ("A100", True),
    "p4de": ("A100", True),
    "p5": ("H100", True),
    "p5e": ("H200", True),
    "p5en": ("H200", True),
}
GPU_FAMILIES = frozenset(name.split(".", 1)[0] for name in GPUS_PER_TYPE)
# Volta: the DLAMI's open kernel modules and torch's CUDA 13 wheels start at Turing (sm_75).
UNSUPPORTED_GPU_FAMILIES = {"p3": "V100 (Volta)", "p3dn": "V100 (Volta)"}

_EFA_SIZES = ("8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")
EFA_TYPES = frozenset(
    {f"{family}.{size}" for family in ("g5", "g6", "g6e") for size in _EFA_SIZES}
    | {
        "g4dn.8xlarge",
        "g4dn.12xlarge",
        "g4dn.16xlarge",
        "g4dn.metal",
        "gr6.8xlarge",
        "p4d.24xlarge",
        "p4de.24xlarge",
        "p5.48xlarge",
        "p5e.48xlarge",
        "p5en.48xlarge",
    }
)
# fi_efa(7): FI_EFA_USE_DEVICE_RDMA=1 on a device without RDMA aborts the application. EC2
# documents RDMA read (GPUDirect RDMA) for these EFA families only (Nitro v4 and newer).
EFA_RDMA_FAMILIES = frozenset({"p4d", "p4de", "p5", "p5e", "p5en"})

# Cluster placement groups take current-generation types except burstable (t*), Mac and the
# flex types, plus these previous generations (AWS: "Placement group rules and limitations").
_PREVIOUS_GENERATION_IN_PLACEMENT = frozenset({"a1", "c3", "c4", "i2", "m4", "r3", "r4"})
_PREVIOUS_GENERATION = re.compile(
    r"^(t1|m1|m2|m3|c1|cc1|cc2|cg1|cr1|g2|hi1|hs1|i2|m4|c3|c4|r3|r4|x1|x1e|d2|h1|g3|g3s|p2|f1|a1)$"
)
_NO_PLACEMENT_GROUP = re.compile(r"^(t\d+[a-z]*|mac\d*[a-z0-9-]*)$")

# Root volume of the Deep Learning Base AMI: its snapshot plus the CUDA torch venv, uv's cache
# and the run's checkpoints, with headroom (AWS recommends 100 GB for the base DLAMI).
GPU_MIN_VOLUME_GB = 100
GPU_DEFAULT_VOLUME_GB = 150
CPU_DEFAULT_VOLUME_GB = 50


def family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def supports_cluster_placement_group(instance_type: str) -> bool:
    name = family(instance_type)
    if _NO_PLACEMENT_GROUP.match(name) or "flex" in instance_type:
        return False
    if _PREVIOUS_GENERATION.match(name):
        return name in _PREVIOUS_GENERATION_IN_PLACEMENT
    return True


def efa_has_rdma(instance_type: str) -> bool:
    return instance_type in EFA_TYPES and family(instance_type) in EFA_RDMA_FAMILIES


def supports_bf16(instance_type: str) -> bool:
    return GPU_MODEL.get(family(instance_type), ("", False))[1]
