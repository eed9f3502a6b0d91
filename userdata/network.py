"""Which network interface reaches the main node (gloo/NCCL must bind that one)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from userdata.errors import AgentError

LOOPBACK = "lo"


def _ip_json(*args: str) -> Any:
    try:
        result = subprocess.run(
            ["ip", "-json", *args], capture_output=True, text=True, check=True, timeout=10
        )
        return json.loads(result.stdout)
    except FileNotFoundError:
        raise AgentError("the `ip` command (iproute2) is missing on this node") from None
    except subprocess.CalledProcessError as error:
        raise AgentError(f"ip {' '.join(args)}: {error.stderr.strip()}") from None
    except ValueError:
        raise AgentError(f"ip {' '.join(args)} answered something that is not JSON") from None


def interface_holding(address: str) -> str | None:
    """The interface that carries `address` itself, loopback last (127.x lives on lo)."""
    holders = [
        link["ifname"]
        for link in _ip_json("-4", "addr", "show")
        for info in link.get("addr_info", [])
        if info.get("local") == address
    ]
    return next((name for name in holders if name != LOOPBACK), holders[0] if holders else None)


def interface_to(address: str) -> str:
    """The interface gloo and NCCL bind to reach `address`, the main node.

    On node 0 the main address is its own: Linux routes it through `lo`, and NCCL would then
    advertise 127.0.0.1 to every other node (NVIDIA/nccl#286). There the answer is the
    interface that holds the address (eth0/ens5), which the other nodes reach.
    """
    try:
        routes = _ip_json("route", "get", address)
        device = str(routes[0]["dev"])
    except AgentError as error:
        raise AgentError(f"no route to the main node {address}: {error}") from None
    except (LookupError, TypeError):
        raise AgentError(f"cannot tell which interface routes to {address}") from None
    if device != LOOPBACK:
        return device
    # 127.x is loopback's own range (one machine's cluster): lo is right there.
    return interface_holding(address) or device
