"""Each setting's check: a value as CDK context gives it (JSON from cdk.json, a string from
`-c key=value`) in, the validated value out, or a ConfigError of one line naming the key, the
value and what is allowed. stacks/config.py reads the settings and applies these."""

from __future__ import annotations

import ipaddress
import re
import shlex

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
    supports_bf16,
)
from userdata.fabric_command import PRECISIONS
from userdata.run_inputs import (
    DataChannel,
    InputError,
    SecretRef,
    parse_data,
    parse_env,
    parse_secrets,
)
from userdata.run_layout import RUN_NAME

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
# CPUs have no float16 autocast.
CPU_PRECISIONS = ("64-true", "32-true", "bf16-mixed", "bf16-true")


def _invalid(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"invalid setting {key}={value!r}: {allowed}")


def integer_setting(key: str, value: object, low: int, high: int) -> int:
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


def boolean_setting(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _invalid(key, value, "expected true or false")


def _string(key: str, value: object, allowed: str) -> str:
    if not isinstance(value, str):
        raise _invalid(key, value, allowed)
    return value.strip()


def choice_setting(key: str, value: object, choices: tuple[str, ...]) -> str:
    allowed = "expected one of " + ", ".join(choices)
    text = _string(key, value, allowed).lower()
    if text not in choices:
        raise _invalid(key, value, allowed)
    return text


def stack_name_setting(value: object) -> str:
    allowed = "expected a CloudFormation stack name: a letter, then up to 127 letters, digits or -"
    text = _string("stack_name", value, allowed)
    if not _STACK_NAME.fullmatch(text):
        raise _invalid("stack_name", value, allowed)
    return text


def storage_stack_setting(value: object, stack_name: str) -> str:
    allowed = (
        "expected the name of the storage stack (the runs' bucket and the logs, shared by the "
        "clusters of an account and region): a letter, then up to 127 letters, digits or -, "
        "not the cluster's own stack_name"
    )
    text = _string("storage_stack", value, allowed)
    if not _STACK_NAME.fullmatch(text) or text == stack_name:
        raise _invalid("storage_stack", value, allowed)
    return text


def instance_type_setting(value: object, accelerator: str) -> str:
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


def devices_per_node_setting(value: object, accelerator: str, instance_type: str) -> int:
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
    devices = integer_setting("devices_per_node", value, 1, MAX_DEVICES_PER_NODE)
    if gpus is not None and devices > gpus:
        raise _invalid(
            "devices_per_node",
            value,
            f"{instance_type} has {gpus} GPU(s): expected 1 to {gpus} or auto",
        )
    return devices


def volume_gb_setting(value: object, accelerator: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return GPU_DEFAULT_VOLUME_GB if accelerator == "gpu" else CPU_DEFAULT_VOLUME_GB
    if accelerator != "gpu":
        return integer_setting("volume_gb", value, 30, MAX_VOLUME_GB)
    # The Deep Learning AMI's snapshot alone is larger than a CPU node's whole disk.
    allowed = (
        f"accelerator=gpu needs {GPU_MIN_VOLUME_GB} to {MAX_VOLUME_GB} GB (the Deep Learning "
        "AMI, CUDA torch and caches), or auto"
    )
    try:
        return integer_setting("volume_gb", value, GPU_MIN_VOLUME_GB, MAX_VOLUME_GB)
    except ConfigError:
        raise _invalid("volume_gb", value, allowed) from None


def precision_setting(value: object, accelerator: str, instance_type: str) -> str:
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


def ami_setting(value: object) -> str | None:
    allowed = 'expected "" (the AMI of the SSM parameter, looked up once) or an id like ami-0abc...'
    text = _string("ami", value, allowed).lower()
    if text == "":
        return None
    if not _AMI.fullmatch(text):
        raise _invalid("ami", value, allowed)
    return text


def efa_setting(value: object, instance_type: str) -> bool:
    enabled = boolean_setting("efa", value)
    if enabled and instance_type not in EFA_TYPES:
        types = ", ".join(sorted(EFA_TYPES))
        raise _invalid("efa", value, f"{instance_type} has no EFA; EFA types: {types}")
    return enabled


def ssh_cidr_setting(value: object) -> str | None:
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


def key_pair_setting(value: object) -> str | None:
    allowed = 'expected "" (no key pair) or the name of an existing EC2 key pair (printable ASCII)'
    if value is None:
        return None
    text = _string("key_pair", value, allowed)
    if text == "":
        return None
    if not _KEY_PAIR.fullmatch(text):
        raise _invalid("key_pair", value, allowed)
    return text


def run_setting(value: object) -> str | None:
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


def artifacts_bucket_setting(value: object) -> str | None:
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


def log_retention_days_setting(value: object) -> int:
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


def script_args_setting(value: object) -> tuple[str, ...]:
    allowed = "expected a string of arguments for the script, shell-quoted"
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    text = _string("script_args", value, allowed)
    try:
        return tuple(shlex.split(text))
    except ValueError as error:
        raise _invalid("script_args", value, f"{allowed} ({error})") from None


def recover_setting(value: object, spot: bool) -> bool:
    """auto: replace lost nodes when they are spot (spot reclaims them), keep plain instances
    otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return spot
    if isinstance(value, bool) or (
        isinstance(value, str) and value.strip().lower() in ("true", "false")
    ):
        return boolean_setting("recover", value)
    raise _invalid("recover", value, "expected auto (true with spot=true), true or false")


def instance_types_setting(
    value: object, accelerator: str, instance_type: str, *, spot: bool, recover: bool, efa: bool
) -> tuple[str, ...]:
    """The types a spot group may launch, instance_type first: the same accelerator, and on
    GPUs the same GPU and count (devices_per_node holds for every one of them)."""
    allowed = (
        'expected "" (instance_type only) or instance types separated by commas, '
        "such as g5.12xlarge,g6.12xlarge"
    )
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        items = [item.strip() for item in _string("instance_types", value, allowed).split(",")]
    items = [item.lower() for item in items if item]
    if not items:
        return (instance_type,)
    if not (spot and recover):
        raise _invalid(
            "instance_types",
            value,
            "needs spot=true and recover=true (each rank's group picks among them, "
            "price-capacity-optimized)",
        )
    types = list(dict.fromkeys([instance_type, *items]))  # instance_type first, no repeats
    for name in types[1:]:
        try:
            instance_type_setting(name, accelerator)
        except ConfigError as error:
            reason = str(error).split(": ", 1)[1]
            raise _invalid("instance_types", value, f"{name}: {reason}") from None
        if accelerator == "gpu" and (
            GPUS_PER_TYPE.get(name) != GPUS_PER_TYPE.get(instance_type)
            or GPU_MODEL.get(name.split(".")[0], ("",))[0]
            != GPU_MODEL.get(instance_type.split(".")[0], ("",))[0]
        ):
            raise _invalid(
                "instance_types",
                value,
                f"{name} must have the GPUs of {instance_type} (the same model and count)",
            )
        if efa and name not in EFA_TYPES:
            raise _invalid("instance_types", value, f"{name} has no EFA (efa=true)")
    return tuple(types)


def data_setting(value: object) -> tuple[DataChannel, ...]:
    try:
        return parse_data(value)
    except InputError as error:
        raise _invalid(
            "data", value, f"{error}; expected s3://bucket/prefix/ or NAME=s3://...,NAME2=s3://..."
        ) from None


def env_setting(value: object) -> dict[str, str]:
    try:
        return parse_env(value)
    except InputError as error:
        raise _invalid("env", value, f"{error}; expected KEY=VALUE,KEY2=VALUE2") from None


def secrets_setting(value: object, env: dict[str, str]) -> tuple[SecretRef, ...]:
    """The message names the references only: they are names, never values."""
    try:
        return parse_secrets(value, env)
    except InputError as error:
        raise _invalid(
            "secrets", value, f"{error}; expected VARIABLE=/parameter/name,VARIABLE2=..."
        ) from None
