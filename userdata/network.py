"""Which network interface reaches the main node (gloo/NCCL must bind that one)."""

from __future__ import annotations

import json
import subprocess

from userdata.errors import AgentError


def interface_to(address: str) -> str:
    """The interface the kernel routes `address` through (`ip route get`)."""
    try:
        result = subprocess.run(
            ["ip", "-json", "route", "get", address],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        routes = json.loads(result.stdout)
        return str(routes[0]["dev"])
    except FileNotFoundError:
        raise AgentError("the `ip` command (iproute2) is missing on this node") from None
    except subprocess.CalledProcessError as error:
        raise AgentError(f"no route to the main node {address}: {error.stderr.strip()}") from None
    except (ValueError, LookupError):
        raise AgentError(f"cannot tell which interface routes to {address}") from None
