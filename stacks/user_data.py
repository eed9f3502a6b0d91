"""Renders userdata/boot.sh with the stack's values into the EC2 user data."""

from __future__ import annotations

import re
import shlex

from stacks.config import PROJECT_DIR, ClusterConfig, ConfigError
from stacks.shared_fs import MOUNT_POINT
from training_project.torch_pins import pinned_version

BOOT_SCRIPT = PROJECT_DIR / "userdata" / "boot.sh"
SETTINGS_MARKER = "# @@SETTINGS@@"
UV_VERSION = "0.13.9"
# uv for the nodes: its PyPI wheel for Linux x86_64 (glibc >= 2.17; Ubuntu 24.04 has 2.39) and
# the sha256 that PyPI publishes for it, checked by boot.sh before the binary is used. A new
# UV_VERSION needs both from https://pypi.org/project/uv/VERSION/#files (tests check them).
UV_WHEEL_URL = (
    "https://files.pythonhosted.org/packages/3d/aa/"
    "26d64642d808de4a652579ef950d7cd2d37f080a8babf9c67c6b75fc4c3f/"
    "uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
)
UV_WHEEL_SHA256 = "d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19"
PYTHON_VERSION = "3.12"
EC2_USER_DATA_LIMIT = 16 * 1024  # bytes, before base64 (EC2's limit)
# A CDK token in the script resolves at deploy to a region, a bucket name (<= 63) or an asset URL.
LONGEST_RESOLVED_VALUE = 128
_TOKEN = re.compile(r"\$\{Token\[[^\]]+\]\}")


def without_comments(script: str) -> str:
    """boot.sh without its comment lines (the shebang and shellcheck's directives stay): they
    explain the source, and the user data has 16 KB for all of it."""
    shebang, _, rest = script.partition("\n")
    kept = [
        line
        for line in rest.split("\n")
        if not line.lstrip().startswith("#") or line.lstrip().startswith("# shellcheck ")
    ]
    return "\n".join([shebang, *kept])


def resolved_size(script: str) -> int:
    """Bytes of the user data once CloudFormation has resolved its tokens, at their longest."""
    return len(_TOKEN.sub("x" * LONGEST_RESOLVED_VALUE, script).encode())


def _quote(value: str) -> str:
    # shlex.quote keeps CDK tokens intact: they resolve inside the single quotes.
    return shlex.quote(value)


def render_boot_script(
    config: ClusterConfig,
    *,
    region: str,
    payload_url: str,
    artifacts_bucket: str,
    run_name: str = "run",
    run_fingerprint: str = "",
    log_group: str = "",
    shared_fs: str = "",
) -> str:
    """boot.sh with its settings block filled in; region/url/bucket may be CDK tokens."""
    settings = {
        "STACK_NAME": config.stack_name,
        "REGION": region,
        "ACCELERATOR": config.accelerator,
        "DEVICES_PER_NODE": str(config.devices_per_node),
        "PRECISION": config.precision,
        "EFA": "true" if config.efa else "false",
        "EFA_RDMA": "true" if config.efa_rdma else "false",
        "MAIN_PORT": str(config.main_port),
        "MAIN_ADDRESS_PARAMETER": config.main_address_parameter,
        "PHASE_PARAMETER": config.phase_parameter_template,
        "MEMBERS_PARAMETER": config.members_parameter,
        "STOP_PARAMETER": config.stop_parameter,
        "PAYLOAD_URL": payload_url,
        "ARTIFACTS_BUCKET": artifacts_bucket,
        "RUN_NAME": run_name,
        "RUN_FINGERPRINT": run_fingerprint,
        "LOG_GROUP": log_group,
        "SHARED_FS": shared_fs,  # the file system's DNS name; "" when each node has its own
        "SHARED_MOUNT": MOUNT_POINT,
        "SCRIPT": config.script,
        "STOP_WHEN_DONE": "true" if config.stop_when_done else "false",
        "MAX_RESTARTS": str(config.max_restarts),
        "MAX_HOURS": str(config.max_hours),
        "RECOVER": "true" if config.recover else "false",
        "CAPACITY_WAIT_MINUTES": str(config.capacity_wait_minutes),
        "MAX_REPLACEMENTS": str(config.max_replacements),
        "UV_VERSION": UV_VERSION,
        "UV_WHEEL_URL": UV_WHEEL_URL,
        "UV_WHEEL_SHA256": UV_WHEEL_SHA256,
        "PYTHON_VERSION": PYTHON_VERSION,
        "TORCH_VERSION": config.torch_version,
        "BOTO3_VERSION": pinned_version("boto3"),
    }
    lines = [f"readonly {name}={_quote(value)}" for name, value in settings.items()]
    lines.append("SCRIPT_ARGS=(" + " ".join(_quote(arg) for arg in config.script_args) + ")")
    script = BOOT_SCRIPT.read_text()
    if script.count(SETTINGS_MARKER) != 1:
        raise ValueError(f"{BOOT_SCRIPT} must hold the line {SETTINGS_MARKER!r} exactly once")
    rendered = without_comments(script.replace(SETTINGS_MARKER, "\n".join(lines)))
    size = resolved_size(rendered)
    if size > EC2_USER_DATA_LIMIT:
        # script_args is the one setting without a bound of its own.
        raise ConfigError(
            f"invalid setting script_args ({len(shlex.join(config.script_args))} characters): "
            f"the user data would be {size} bytes, over EC2's limit of {EC2_USER_DATA_LIMIT}; "
            "put long arguments in a file of the payload and pass its path"
        )
    return rendered
