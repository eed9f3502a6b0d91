"""Powering the node off when training ends, guarded so it can only happen on a real EC2 node.

Allowed only when all hold: the boot script set FABRIC_POWEROFF=allowed (it does so only on a
real EC2 boot, never in a rehearsal), IMDS is the real one, and the hardware says EC2. No dry
run, test, local cluster or rehearsal can power off the machine it runs on.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HYPERVISOR_UUID = Path("/sys/hypervisor/uuid")
DMI_ASSET_TAG = Path("/sys/devices/virtual/dmi/id/board_asset_tag")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def on_ec2_hardware() -> bool:
    return _read(HYPERVISOR_UUID).lower().startswith("ec2") or _read(DMI_ASSET_TAG).startswith("i-")


def refusal(dry_run: bool) -> str | None:
    """Why powering off is not allowed here, or None when it is."""
    if dry_run:
        return "dry run"
    if os.environ.get("FABRIC_POWEROFF") != "allowed":
        return "not started by the boot script on EC2 (FABRIC_POWEROFF is not 'allowed')"
    if os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        return "IMDS is not the real one"
    if not on_ec2_hardware():
        return "this machine is not an EC2 instance"
    return None


def power_off(dry_run: bool) -> bool:
    """Powers off when allowed (the instance stops: shutdown behaviour is 'stop')."""
    reason = refusal(dry_run)
    if reason:
        print(f"[fabric-agent] would stop now (not powering off: {reason})", flush=True)
        return False
    print("[fabric-agent] stopping the node now (stop_when_done)", flush=True)
    subprocess.run(["systemctl", "poweroff"], check=False)
    return True
