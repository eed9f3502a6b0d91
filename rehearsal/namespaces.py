"""One network namespace per emulated instance, joined by veth pairs to a bridge that lives in a
namespace of its own. The root namespace gets no interface and no address of the emulated VPC,
so no traffic between nodes ever leaves the namespaces.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class NamespaceError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def namespaces_available() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if not Path("/proc/self/ns/net").exists():
        return "this platform has no network namespaces"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        return "the `ip` command (iproute2) is missing: apt-get install iproute2"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


class EmulatedNetwork:
    def __init__(self, prefix: str, prefix_length: int) -> None:
        self.prefix = prefix  # short: interface names are at most 15 characters
        self.prefix_length = prefix_length
        self.bridge_namespace = f"{prefix}-br"
        self.created: list[str] = []

    def node_namespace(self, rank: int) -> str:
        return f"{self.prefix}-n{rank}"

    def create(self, addresses: list[str]) -> None:
        """All namespaces and the bridge first, before any process starts."""
        _ip("netns", "add", self.bridge_namespace)
        self.created.append(self.bridge_namespace)
        _ip("-n", self.bridge_namespace, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_namespace, "link", "set", "br0", "up")
        for rank, address in enumerate(addresses):
            namespace = self.node_namespace(rank)
            _ip("netns", "add", namespace)
            self.created.append(namespace)
            inside, outside = f"{self.prefix}i{rank}", f"{self.prefix}o{rank}"
            # Both ends are created directly in their namespaces: never in the root one.
            _ip(
                "link",
                "add",
                inside,
                "netns",
                namespace,
                "type",
                "veth",
                "peer",
                "name",
                outside,
                "netns",
                self.bridge_namespace,
            )
            _ip("-n", namespace, "link", "set", inside, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{address}/{self.prefix_length}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", self.bridge_namespace, "link", "set", outside, "master", "br0")
            _ip("-n", self.bridge_namespace, "link", "set", outside, "up")

    def exec_prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.node_namespace(rank)]

    def delete(self) -> list[str]:
        """Deletes every namespace it made (their veths go with them); returns failures."""
        failures = []
        for namespace in reversed(self.created):
            try:
                _ip("netns", "delete", namespace)
            except NamespaceError as error:
                failures.append(str(error))
        self.created.clear()
        return failures
