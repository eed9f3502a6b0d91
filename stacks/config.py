"""The cluster's settings: read from CDK context and validated in one place, before any construct.

Every default lives in cdk.json's "context". Values arrive as JSON from cdk.json and as strings
from the CLI (`cdk deploy -c num_nodes=4`); both are accepted. A bad value raises ConfigError
whose message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stacks.errors import ConfigError
from stacks.instance_types import efa_has_rdma, supports_cluster_placement_group
from stacks.setting_checks import (
    ami_setting,
    artifacts_bucket_setting,
    boolean_setting,
    choice_setting,
    data_setting,
    devices_per_node_setting,
    efa_setting,
    env_setting,
    instance_type_setting,
    instance_types_setting,
    integer_setting,
    key_pair_setting,
    log_retention_days_setting,
    precision_setting,
    recover_setting,
    run_setting,
    script_args_setting,
    secrets_setting,
    ssh_cidr_setting,
    stack_name_setting,
    storage_stack_setting,
    volume_gb_setting,
)
from training_project.errors import ProjectError
from training_project.load import load_project
from training_project.torch_pins import pinned_version
from userdata.imds import MAX_NODES, TAG_CLUSTER, TAG_NODE_RANK, TAG_NUM_NODES
from userdata.run_inputs import RunInputs

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The run directory: on a file system every node mounts (efs), or on each node's own disk.
SHARED_FS = ("efs", "none")
# The tag contract, defined where nodes read it; ConfigError, where settings are read.
__all__ = ["TAG_CLUSTER", "TAG_NODE_RANK", "TAG_NUM_NODES", "ConfigError"]

MAX_RESTARTS = 10
MAX_HOURS = 168
MAX_REPLACEMENTS = 100
MAX_CAPACITY_WAIT_MINUTES = 1440


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
    shared_fs: str  # "efs": the run directory on a file system every node mounts; "none": disks
    # Each rank an Auto Scaling group of one instance that replaces a lost node (else one
    # instance per rank); instance_types: what a spot group may launch, instance_type first.
    recover: bool = False
    instance_types: tuple[str, ...] = ()
    max_replacements: int = 5
    capacity_wait_minutes: int = 30
    # The script's data channels, variables and secrets' names (userdata/run_inputs.py).
    inputs: RunInputs = field(default_factory=RunInputs)

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
    "shared_fs",
    "recover",
    "instance_types",
    "max_replacements",
    "capacity_wait_minutes",
    "data",
    "env",
    "secrets",
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
    accelerator = choice_setting("accelerator", raw["accelerator"], ("cpu", "gpu"))
    try:
        project = load_project(raw["project"], raw["script"], project_dir, pinned_version("torch"))
    except ProjectError as error:  # a setting like any other: one line, as ConfigError
        raise ConfigError(str(error)) from None
    instance_type = instance_type_setting(raw["instance_type"], accelerator)
    stack_name = stack_name_setting(raw["stack_name"])
    spot = boolean_setting("spot", raw["spot"])
    recover = recover_setting(raw["recover"], spot)
    efa = efa_setting(raw["efa"], instance_type)
    env = env_setting(raw["env"])
    return ClusterConfig(
        stack_name=stack_name,
        storage_stack=storage_stack_setting(raw["storage_stack"], stack_name),
        num_nodes=integer_setting("num_nodes", raw["num_nodes"], 1, MAX_NODES),
        devices_per_node=devices_per_node_setting(
            raw["devices_per_node"], accelerator, instance_type
        ),
        accelerator=accelerator,
        instance_type=instance_type,
        volume_gb=volume_gb_setting(raw["volume_gb"], accelerator),
        ssh_cidr=ssh_cidr_setting(raw["ssh_cidr"]),
        key_pair=key_pair_setting(raw["key_pair"]),
        main_port=integer_setting("main_port", raw["main_port"], 1024, 65535),
        project=project.path,
        script=project.script,
        torch_version=project.torch_version,
        script_args=script_args_setting(raw["script_args"]),
        stop_when_done=boolean_setting("stop_when_done", raw["stop_when_done"]),
        max_restarts=integer_setting("max_restarts", raw["max_restarts"], 0, MAX_RESTARTS),
        max_hours=integer_setting("max_hours", raw["max_hours"], 1, MAX_HOURS),
        efa=efa,
        spot=spot,
        precision=precision_setting(raw["precision"], accelerator, instance_type),
        ami=ami_setting(raw["ami"]) if raw["ami"] is not None else None,
        run=run_setting(raw["run"]),
        artifacts_bucket=artifacts_bucket_setting(raw["artifacts_bucket"]),
        log_retention_days=log_retention_days_setting(raw["log_retention_days"]),
        shared_fs=choice_setting("shared_fs", raw["shared_fs"], SHARED_FS),
        recover=recover,
        instance_types=instance_types_setting(
            raw["instance_types"], accelerator, instance_type, spot=spot, recover=recover, efa=efa
        ),
        max_replacements=integer_setting(
            "max_replacements", raw["max_replacements"], 0, MAX_REPLACEMENTS
        ),
        capacity_wait_minutes=integer_setting(
            "capacity_wait_minutes", raw["capacity_wait_minutes"], 1, MAX_CAPACITY_WAIT_MINUTES
        ),
        inputs=RunInputs(
            data=data_setting(raw["data"]),
            env=env,
            secrets=secrets_setting(raw["secrets"], env),
        ),
    )
