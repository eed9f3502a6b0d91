"""The cluster's settings: read from CDK context and validated in one place, before any construct.

Every default lives in cdk.json's "context". Values arrive as JSON from cdk.json and as strings
from the CLI (`cdk deploy -c num_nodes=4`); both are accepted. A bad value raises ConfigError
whose message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from stacks.errors import ConfigError
from stacks.instance_types import (
    CPU_DEFAULT_VOLUME_GB,
    EFA_TYPES,
    GPU_DEFAULT_VOLUME_GB,
    GPU_FAMILIES,
    GPU_MIN_VOLUME_GB,
    GPU_MODEL,
    GPUS_PER_TYPE,
    UNSUPPORTED_GPU_FAMILIES,
    efa_has_rdma,
    supports_bf16,
    supports_cluster_placement_group,
)
from training_project.errors import ProjectError
from training_project.load import load_project
from training_project.torch_pins import pinned_version
from userdata.fabric_command import PRECISIONS
from userdata.imds import MAX_NODES, TAG_NODE_RANK, TAG_NUM_NODES
from userdata.run_layout import RUN_NAME

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The tag contract, defined where nodes read it; ConfigError, where settings are read.
__all__ = ["TAG_NODE_RANK", "TAG_NUM_NODES", "ConfigError"]

_GRAVITON = re.compile(r"^[a-z]+\d+g[a-z]*$")
_INSTANCE_TYPE = re.compile(r"^([a-z][a-z0-9-]*)\.([a-z0-9-]+)$")
_STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_AMI = re.compile(r"^ami-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# What CloudWatch Logs accepts as a retention period.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827,
                      2192, 2557, 2922, 3288, 3653)  # fmt: skip
_KEY_PAIR = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,253}[\x21-\x7e]$|^[\x21-\x7e]$")

MAX_DEVICES_PER_NODE = 128
MAX_VOLUME_GB = 16384
MAX_RESTARTS = 10
MAX_HOURS = 168
# CPUs have no float16 autocast.
CPU_PRECISIONS = ("64-true", "32-true", "bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class ClusterConfig:
    stack_name: str
    storage_stack: str  # the long-lived stack of the runs' bucket and the logs
    num_nodes: int
    devices_per_node: int
    accelerator: str
    instance_type: str
    volume_gb: int
    ssh_cidr: str | None  # None: only from inside the VPC
    key_pair: str | None
    main_port: int
    project: Path  # the user's project folder, absolute
    script: str  # relative to the project
    torch_version: str  # what the nodes install (the accelerator's build of it)
    script_args: tuple[str, ...]
    stop_when_done: bool
    max_restarts: int
    max_hours: int
    efa: bool
    spot: bool
    precision: str
    ami: str | None  # None: the image of the SSM parameter, looked up once and cached
    run: str | None  # None: named after what the nodes run (stacks/run_name.py)
    artifacts_bucket: str | None  # None: the stack makes its own (and cdk destroy keeps it)
    log_retention_days: int

    @property
    def instance_family(self) -> str:
        return self.instance_type.split(".", 1)[0]

    @property
    def supports_cluster_placement_group(self) -> bool:
        return supports_cluster_placement_group(self.instance_type)

    @property
    def efa_rdma(self) -> bool:
        return self.efa and efa_has_rdma(self.instance_type)

    @property
    def parameter_prefix(self) -> str:
        return parameter_prefix(self.stack_name)

    @property
    def main_address_parameter(self) -> str:
        return main_address_parameter(self.stack_name)

    @property
    def phase_parameter_template(self) -> str:
        return phase_parameter_template(self.stack_name)

    def phase_parameter(self, rank: int) -> str:
        return self.phase_parameter_template.format(rank=rank)

    @property
    def members_parameter(self) -> str:
        return members_parameter(self.stack_name)

    @property
    def stop_parameter(self) -> str:
        return stop_parameter(self.stack_name)


def parameter_prefix(stack_name: str) -> str:
    return f"/fabric/{stack_name}"


def main_address_parameter(stack_name: str) -> str:
    return f"{parameter_prefix(stack_name)}/main-address"


def phase_parameter_template(stack_name: str) -> str:
    """Where node {rank} records its phase; the node agent fills in the rank."""
    return f"{parameter_prefix(stack_name)}/node-{{rank}}/phase"


def members_parameter(stack_name: str) -> str:
    """The cluster's instance ids in rank order, comma-separated, written by CloudFormation
    once every node exists: a node whose id is not there belongs to another deploy."""
    return f"{parameter_prefix(stack_name)}/members"


def stop_parameter(stack_name: str) -> str:
    """The cluster-wide stop (failed or interrupted), written once by the first node that
    stops the cluster; every node reads this one parameter instead of every peer's phase."""
    return f"{parameter_prefix(stack_name)}/stop"


def _invalid(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"invalid setting {key}={value!r}: {allowed}")


def _integer(key: str, value: object, low: int, high: int) -> int:
    allowed = f"expected an integer from {low} to {high}"
    if isinstance(value, bool):
        raise _invalid(key, value, allowed)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", value):
        number = int(value)
    else:
        raise _invalid(key, value, allowed)
    if not low <= number <= high:
        raise _invalid(key, value, allowed)
    return number


def _boolean(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _invalid(key, value, "expected true or false")


def _string(key: str, value: object, allowed: str) -> str:
    if not isinstance(value, str):
        raise _invalid(key, value, allowed)
    return value.strip()


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    allowed = "expected one of " + ", ".join(choices)
    text = _string(key, value, allowed).lower()
    if text not in choices:
        raise _invalid(key, value, allowed)
    return text


def _stack_name(value: object) -> str:
    allowed = "expected a CloudFormation stack name: a letter, then up to 127 letters, digits or -"
    text = _string("stack_name", value, allowed)
    if not _STACK_NAME.fullmatch(text):
        raise _invalid("stack_name", value, allowed)
    return text


def _storage_stack(value: object, stack_name: str) -> str:
    allowed = (
        "expected the name of the storage stack (the runs' bucket and the logs, shared by the "
        "clusters of an account and region): a letter, then up to 127 letters, digits or -, "
        "not the cluster's own stack_name"
    )
    text = _string("storage_stack", value, allowed)
    if not _STACK_NAME.fullmatch(text) or text == stack_name:
        raise _invalid("storage_stack", value, allowed)
    return text


def _instance_type(value: object, accelerator: str) -> str:
    allowed = "expected an EC2 instance type name such as t2.large, c7i.2xlarge or g5.xlarge"
    text = _string("instance_type", value, allowed).lower()
    match = _INSTANCE_TYPE.fullmatch(text)
    if not match:
        raise _invalid("instance_type", value, allowed)
    family = match.group(1)
    if family in UNSUPPORTED_GPU_FAMILIES:
        raise _invalid(
            "instance_type",
            value,
            f"{family} has {UNSUPPORTED_GPU_FAMILIES[family]} GPUs, which the Deep Learning "
            "AMI's drivers and torch's CUDA 13 wheels do not support (Turing or newer: g4dn, "
            "g5, g6, g6e, p4d, p5)",
        )
    if _GRAVITON.match(family) and family not in GPU_FAMILIES:
        raise _invalid(
            "instance_type",
            value,
            "arm64 (Graviton) types are not supported: the node AMI is amd64",
        )
    if accelerator == "cpu" and family in GPU_FAMILIES:
        raise _invalid(
            "instance_type",
            value,
            f"{family} is a GPU type, but accelerator=cpu would train on its CPUs at GPU prices "
            "(with the plain AMI and CPU torch): pass -c accelerator=gpu, or pick a CPU type "
            "such as c7i.2xlarge",
        )
    if accelerator == "gpu" and family not in GPU_FAMILIES:
        families = ", ".join(sorted(GPU_FAMILIES))
        raise _invalid(
            "instance_type", value, f"accelerator=gpu needs an NVIDIA GPU family ({families})"
        )
    return text


def _devices_per_node(value: object, accelerator: str, instance_type: str) -> int:
    gpus = GPUS_PER_TYPE.get(instance_type) if accelerator == "gpu" else None
    if isinstance(value, str) and value.strip().lower() == "auto":
        if gpus is None:
            known = ", ".join(sorted(GPUS_PER_TYPE))
            raise _invalid(
                "devices_per_node",
                value,
                f"auto needs accelerator=gpu and a GPU type it knows ({known})",
            )
        return gpus
    devices = _integer("devices_per_node", value, 1, MAX_DEVICES_PER_NODE)
    if gpus is not None and devices > gpus:
        raise _invalid(
            "devices_per_node",
            value,
            f"{instance_type} has {gpus} GPU(s): expected 1 to {gpus} or auto",
        )
    return devices


def _volume_gb(value: object, accelerator: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return GPU_DEFAULT_VOLUME_GB if accelerator == "gpu" else CPU_DEFAULT_VOLUME_GB
    if accelerator != "gpu":
        return _integer("volume_gb", value, 30, MAX_VOLUME_GB)
    # The Deep Learning AMI's snapshot alone is larger than a CPU node's whole disk.
    allowed = (
        f"accelerator=gpu needs {GPU_MIN_VOLUME_GB} to {MAX_VOLUME_GB} GB (the Deep Learning "
        "AMI, CUDA torch and caches), or auto"
    )
    try:
        return _integer("volume_gb", value, GPU_MIN_VOLUME_GB, MAX_VOLUME_GB)
    except ConfigError:
        raise _invalid("volume_gb", value, allowed) from None


def _precision(value: object, accelerator: str, instance_type: str) -> str:
    if accelerator == "cpu":
        choices = CPU_PRECISIONS
    elif supports_bf16(instance_type):
        choices = PRECISIONS
    else:
        choices = tuple(p for p in PRECISIONS if not p.startswith("bf16"))
    allowed = "expected auto or one of " + ", ".join(choices)
    text = _string("precision", value, allowed).lower()
    if text == "auto":
        if accelerator == "cpu":
            return "32-true"
        return "bf16-mixed" if supports_bf16(instance_type) else "16-mixed"
    if text in PRECISIONS and text not in choices and accelerator == "gpu":
        gpu = GPU_MODEL[instance_type.split(".", 1)[0]][0]
        allowed = f"the {gpu} of {instance_type} has no bfloat16; {allowed}"
    if text not in choices:
        raise _invalid("precision", value, allowed)
    return text


def _ami(value: object) -> str | None:
    allowed = 'expected "" (the AMI of the SSM parameter, looked up once) or an id like ami-0abc...'
    text = _string("ami", value, allowed).lower()
    if text == "":
        return None
    if not _AMI.fullmatch(text):
        raise _invalid("ami", value, allowed)
    return text


def _efa(value: object, instance_type: str) -> bool:
    enabled = _boolean("efa", value)
    if enabled and instance_type not in EFA_TYPES:
        types = ", ".join(sorted(EFA_TYPES))
        raise _invalid("efa", value, f"{instance_type} has no EFA; EFA types: {types}")
    return enabled


def _ssh_cidr(value: object) -> str | None:
    allowed = 'expected "vpc" (SSH only from inside the VPC) or an IPv4 CIDR such as 203.0.113.7/32'
    text = _string("ssh_cidr", value, allowed)
    if text.lower() == "vpc":
        return None
    if "/" not in text:
        raise _invalid("ssh_cidr", value, allowed)
    try:
        return str(ipaddress.IPv4Network(text, strict=True))
    except ValueError:
        raise _invalid("ssh_cidr", value, allowed) from None


def _key_pair(value: object) -> str | None:
    allowed = 'expected "" (no key pair) or the name of an existing EC2 key pair (printable ASCII)'
    if value is None:
        return None
    text = _string("key_pair", value, allowed)
    if text == "":
        return None
    if not _KEY_PAIR.fullmatch(text):
        raise _invalid("key_pair", value, allowed)
    return text


def _run(value: object) -> str | None:
    allowed = (
        '"" (named after what the nodes run: the same project and settings continue the same '
        "run) or a name of letters, digits, . _ - (up to 64, starting with a letter or digit)"
    )
    if value is None:
        return None
    text = _string("run", value, allowed)
    if text == "":
        return None
    if not RUN_NAME.fullmatch(text):
        raise _invalid("run", value, allowed)
    return text


def _artifacts_bucket(value: object) -> str | None:
    allowed = (
        '"" (the stack makes its bucket) or the name of an existing S3 bucket, such as the one '
        "a destroyed cluster kept (its ArtifactsBucket output)"
    )
    if value is None:
        return None
    text = _string("artifacts_bucket", value, allowed)
    if text == "":
        return None
    if not _BUCKET.fullmatch(text) or ".." in text:
        raise _invalid("artifacts_bucket", value, allowed)
    return text


def _log_retention_days(value: object) -> int:
    allowed = "expected one of CloudWatch's retention periods in days: " + ", ".join(
        map(str, LOG_RETENTION_DAYS)
    )
    if isinstance(value, bool):
        raise _invalid("log_retention_days", value, allowed)
    try:
        days = int(str(value).strip())
    except ValueError:
        raise _invalid("log_retention_days", value, allowed) from None
    if days not in LOG_RETENTION_DAYS:
        raise _invalid("log_retention_days", value, allowed)
    return days


def _script_args(value: object) -> tuple[str, ...]:
    allowed = "expected a string of arguments for the script, shell-quoted"
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    text = _string("script_args", value, allowed)
    try:
        return tuple(shlex.split(text))
    except ValueError as error:
        raise _invalid("script_args", value, f"{allowed} ({error})") from None


SETTINGS = (
    "stack_name",
    "num_nodes",
    "devices_per_node",
    "accelerator",
    "instance_type",
    "volume_gb",
    "ssh_cidr",
    "key_pair",
    "main_port",
    "project",
    "script",
    "script_args",
    "stop_when_done",
    "max_restarts",
    "max_hours",
    "efa",
    "spot",
    "precision",
    "ami",
    "run",
    "artifacts_bucket",
    "log_retention_days",
    "storage_stack",
)


def check_known_settings(keys: Iterable[str]) -> None:
    """A typo in a setting name is an error, not a silent default. CDK's own keys start with @
    (feature flags) or hold a colon (aws:cdk:..., cached lookups such as ssm:account=...)."""
    for key in sorted(keys):
        if key in SETTINGS or key.startswith("@") or ":" in key:
            continue
        close = difflib.get_close_matches(key, SETTINGS, n=1)
        hint = f"did you mean {close[0]}?" if close else "settings: " + ", ".join(SETTINGS)
        raise ConfigError(f"unknown setting {key}: {hint}")


def load_config(
    get_context: Callable[[str], object], project_dir: Path = PROJECT_DIR
) -> ClusterConfig:
    """Validates every setting; raises ConfigError on the first bad or missing one."""
    raw: dict[str, object] = {}
    for key in SETTINGS:
        value = get_context(key)
        if value is None and key not in ("key_pair", "ami", "run", "artifacts_bucket"):
            raise ConfigError(
                f'missing setting {key}: set it in cdk.json "context" or pass -c {key}=VALUE'
            )
        raw[key] = value
    accelerator = _choice("accelerator", raw["accelerator"], ("cpu", "gpu"))
    try:
        project = load_project(raw["project"], raw["script"], project_dir, pinned_version("torch"))
    except ProjectError as error:  # a setting like any other: one line, as ConfigError
        raise ConfigError(str(error)) from None
    instance_type = _instance_type(raw["instance_type"], accelerator)
    stack_name = _stack_name(raw["stack_name"])
    return ClusterConfig(
        stack_name=stack_name,
        storage_stack=_storage_stack(raw["storage_stack"], stack_name),
        num_nodes=_integer("num_nodes", raw["num_nodes"], 1, MAX_NODES),
        devices_per_node=_devices_per_node(raw["devices_per_node"], accelerator, instance_type),
        accelerator=accelerator,
        instance_type=instance_type,
        volume_gb=_volume_gb(raw["volume_gb"], accelerator),
        ssh_cidr=_ssh_cidr(raw["ssh_cidr"]),
        key_pair=_key_pair(raw["key_pair"]),
        main_port=_integer("main_port", raw["main_port"], 1024, 65535),
        project=project.path,
        script=project.script,
        torch_version=project.torch_version,
        script_args=_script_args(raw["script_args"]),
        stop_when_done=_boolean("stop_when_done", raw["stop_when_done"]),
        max_restarts=_integer("max_restarts", raw["max_restarts"], 0, MAX_RESTARTS),
        max_hours=_integer("max_hours", raw["max_hours"], 1, MAX_HOURS),
        efa=_efa(raw["efa"], instance_type),
        spot=_boolean("spot", raw["spot"]),
        precision=_precision(raw["precision"], accelerator, instance_type),
        ami=_ami(raw["ami"]) if raw["ami"] is not None else None,
        run=_run(raw["run"]),
        artifacts_bucket=_artifacts_bucket(raw["artifacts_bucket"]),
        log_retention_days=_log_retention_days(raw["log_retention_days"]),
    )
