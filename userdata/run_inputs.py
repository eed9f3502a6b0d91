"""What a deploy hands the script besides its code: data channels (S3 prefixes copied to every
node's own disk), environment variables, and secrets (names only: a node reads their values at
boot with its role, and they are never written down). One definition of their forms, read by
the synth (stacks/input_settings.py), the local cluster and the node agent (inputs.json in the
payload), and of the variables that the agent and `fabric run` set themselves.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR_ENV = "FABRIC_DATA_DIR"
INPUTS_FILE = "inputs.json"  # at the payload's root
SINGLE_CHANNEL = "data"  # the channel of a bare s3://... value
MAX_CHANNELS = 16  # each adds two statements to the node role (10,240 characters in all)
MAX_SECRETS = 32
MAX_ENV_BYTES = 32 * 1024

# Set by the node agent (userdata/fabric_command.py, training.py), by `fabric run` and torchrun
# on every rank, or by the boot script: a user's value would be overwritten, or would break
# the cluster (listed in the README).
AGENT_VARIABLES = frozenset(
    {
        "OMP_NUM_THREADS", "PET_RDZV_CONF", "PYTHONUNBUFFERED", "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME", "LD_LIBRARY_PATH", "FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA",
        "PATH", "HOME", "AWS_DEFAULT_REGION", "MASTER_ADDR", "MASTER_PORT", "RANK",
        "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK",
    }
)  # fmt: skip
AGENT_PREFIXES = ("FABRIC_", "PET_", "TORCHELASTIC_", "LT_")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_CHANNEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Not in a prefix: IAM wildcards and policy variables (they would widen the grant), control
# characters; S3 keys are otherwise any UTF-8.
_PREFIX_REFUSED = re.compile(r"[*?$\x00-\x1f\x7f]")
_SSM_NAME = re.compile(r"^/?[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*$")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$")
_ARN = re.compile(r"^arn:(aws|aws-cn|aws-us-gov):(ssm|secretsmanager):([a-z0-9-]+):(\d{12}):(.+)$")
_NAMED = re.compile(r"^[^=/:]+=")
# Items of KEY=VALUE,KEY2=VALUE2: a comma starts a new item only before a NAME=.
_NEXT_ITEM = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_-]*=)")


class InputError(ValueError):
    """What is wrong with a data, env or secrets value and what is allowed, in one line."""


@dataclass(frozen=True)
class DataChannel:
    name: str
    bucket: str
    prefix: str  # "" (the whole bucket) or ending with "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class SecretRef:
    variable: str
    service: str  # "ssm" (a Parameter Store parameter) or "secretsmanager"
    name: str  # the parameter's or secret's name, or its ARN

    @property
    def arn_parts(self) -> tuple[str, str, str, str] | None:
        """(partition, region, account, resource) when given as an ARN."""
        match = _ARN.fullmatch(self.name)
        return (match[1], match[3], match[4], match[5]) if match else None

    def describe(self) -> str:
        kind = "parameter" if self.service == "ssm" else "secret"
        return f"{self.variable} ({kind} {self.name})"


@dataclass(frozen=True)
class RunInputs:
    data: tuple[DataChannel, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[SecretRef, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "data": [vars(channel) for channel in self.data],
                "env": self.env,
                "secrets": [vars(secret) for secret in self.secrets],
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> RunInputs:
        raw = json.loads(text)
        return cls(
            data=tuple(DataChannel(**item) for item in raw.get("data", [])),
            env=dict(raw.get("env", {})),
            secrets=tuple(SecretRef(**item) for item in raw.get("secrets", [])),
        )

    @classmethod
    def read(cls, path: str | Path) -> RunInputs:
        return cls.from_json(Path(path).read_text()) if path else cls()


def reserved(name: str) -> bool:
    return name in AGENT_VARIABLES or name.startswith(AGENT_PREFIXES)


def variable_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(
            f"{name!r} is not a variable name (a letter or _, then letters, digits or _)"
        )
    if reserved(name):
        raise InputError(
            f"{name} is set by the node agent or fabric run (the names "
            f"{', '.join(AGENT_PREFIXES)}* and {', '.join(sorted(AGENT_VARIABLES))})"
        )
    return name


def _pairs(value: object, what: str) -> list[tuple[str, str]]:
    """A JSON object (cdk.json) or KEY=VALUE,KEY2=VALUE2 (the CLI); "" is none."""
    if isinstance(value, dict):
        if not all(isinstance(key, str) and isinstance(item, str) for key, item in value.items()):
            raise InputError(f"expected an object of string {what}s")
        return list(value.items())
    if not isinstance(value, str):
        raise InputError(f"expected NAME={what.upper()},NAME2={what.upper()} or a JSON object")
    pairs = []
    for item in _NEXT_ITEM.split(value.strip()) if value.strip() else []:
        key, equals, item_value = item.partition("=")
        if not equals:
            raise InputError(f"{item.strip()!r} is not NAME={what.upper()}")
        pairs.append((key.strip(), item_value))
    return pairs


def s3_location(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending with / or ""): a folder, whether or not the URI ends with /."""
    if not uri.startswith("s3://"):
        raise InputError(f"{uri!r} is not an S3 location (s3://bucket/prefix/)")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _looks_like_address(bucket):
        raise InputError(
            f"{bucket!r} is not an S3 bucket name (3 to 63 lowercase letters, digits, dots "
            "and hyphens, starting and ending with a letter or digit, not an IP address)"
        )
    if prefix.startswith("/") or "//" in prefix or ".." in prefix.split("/"):
        raise InputError(f"{uri!r}: the prefix must not start with /, hold // or a .. folder")
    if _PREFIX_REFUSED.search(prefix):
        raise InputError(f"{uri!r}: the prefix must not hold *, ?, $ or control characters")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def _looks_like_address(bucket: str) -> bool:
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return False
    return True


def parse_data(value: object) -> tuple[DataChannel, ...]:
    """s3://bucket/prefix/ (the channel "data"), NAME=s3://...,NAME2=s3://..., a JSON object
    of channels, or "" (none)."""
    if isinstance(value, str) and value.strip() and not _NAMED.match(value.strip()):
        pairs = [(SINGLE_CHANNEL, value.strip())]
    else:
        pairs = _pairs(value, "uri")
    channels: list[DataChannel] = []
    for name, uri in pairs:
        if not _CHANNEL.fullmatch(name):
            raise InputError(
                f"{name!r} is not a channel name (up to 64 letters, digits, _ or -, "
                "starting with a letter or digit)"
            )
        if name in (channel.name for channel in channels):
            raise InputError(f"channel {name} is given twice")
        channels.append(DataChannel(name, *s3_location(uri.strip())))
    if len(channels) > MAX_CHANNELS:
        raise InputError(f"{len(channels)} channels: at most {MAX_CHANNELS}")
    return tuple(channels)


def parse_env(value: object) -> dict[str, str]:
    """KEY=VALUE,KEY2=VALUE2 (a value may hold commas) or a JSON object; "" is none."""
    env: dict[str, str] = {}
    for name, item in _pairs(value, "value"):
        if name in env:
            raise InputError(f"{name} is given twice")
        if "\x00" in item:
            raise InputError(f"{name}: a value cannot hold a NUL character")
        env[variable_name(name)] = item
    size = sum(len(name) + len(item) + 2 for name, item in env.items())
    if size > MAX_ENV_BYTES:
        raise InputError(f"{size} bytes of variables: at most {MAX_ENV_BYTES}")
    return env


def secret_ref(variable: str, reference: str) -> SecretRef:
    """/a/parameter or ssm:name (Parameter Store), secretsmanager:name (Secrets Manager), or
    either's ARN."""
    reference = reference.strip()
    match = _ARN.fullmatch(reference)
    if match:
        service, resource = match[2], match[5]
        if service == "ssm" and resource.startswith("parameter/"):
            return SecretRef(variable, "ssm", reference)
        if service == "secretsmanager" and resource.startswith("secret:"):
            return SecretRef(variable, "secretsmanager", reference)
    elif reference.startswith("secretsmanager:"):
        name = reference.removeprefix("secretsmanager:")
        if _SECRET_NAME.fullmatch(name):
            return SecretRef(variable, "secretsmanager", name)
    else:
        name = reference.removeprefix("ssm:")
        if (
            (reference.startswith("/") or reference.startswith("ssm:"))
            and _SSM_NAME.fullmatch(name)
            and len(name) <= 1011
            and (name.startswith("/") or "/" not in name)  # SSM: a path starts with /
            and not name.lstrip("/").lower().startswith(("aws", "ssm"))
        ):
            return SecretRef(variable, "ssm", name)
    raise InputError(
        f"{variable}={reference!r}: expected a SecureString parameter (/path/name or ssm:name, "
        "not under aws or ssm), a Secrets Manager secret (secretsmanager:name), or either's ARN"
    )


def parse_secrets(value: object, env: dict[str, str]) -> tuple[SecretRef, ...]:
    """VARIABLE=reference,...; a variable is not also in env."""
    secrets: list[SecretRef] = []
    for name, reference in _pairs(value, "reference"):
        variable_name(name)
        if name in env or name in (secret.variable for secret in secrets):
            raise InputError(f"{name} is given twice (a variable is in env or in secrets)")
        secrets.append(secret_ref(name, reference))
    if len(secrets) > MAX_SECRETS:
        raise InputError(f"{len(secrets)} secrets: at most {MAX_SECRETS}")
    return tuple(secrets)
