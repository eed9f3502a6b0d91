"""One network namespace per emulated instance, joined by veth pairs to a bridge that lives in a
namespace of its own. The root namespace gets no interface and no address of the emulated VPC,
so no traffic between nodes ever leaves the namespaces.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Collection
from pathlib import Path

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts a namespace under its name


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


def network_namespace(pid: int) -> int | None:
    """The inode of a process's network namespace (None once it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def named_namespaces() -> dict[int, str]:
    """inode -> name of every namespace `ip netns` names now."""
    named = {}
    for entry in NETNS_DIR.iterdir() if NETNS_DIR.exists() else []:
        try:
            named[entry.stat().st_ino] = entry.name
        except OSError:
            continue
    return named


def processes_in(inodes: Collection[int]) -> list[int]:
    """Live processes inside any of these namespaces, deleted ones included.

    `ip netns delete` only removes the name: a namespace lives on, out of `ip netns list`'s
    sight, for as long as a process is inside it.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and network_namespace(int(entry.name)) in inodes:
            found.append(int(entry.name))
    return found


class EmulatedNetwork:
    def __init__(self, prefix: str, prefix_length: int) -> None:
        self.prefix = prefix  # short: interface names are at most 15 characters
        self.prefix_length = prefix_length
        self.bridge_namespace = f"{prefix}-br"
        self.created: list[str] = []
        self.inodes: dict[str, int] = {}  # name -> namespace inode: finds it once deleted too
        self.links: list[str] = []

    def node_namespace(self, rank: int) -> str:
        return f"{self.prefix}-n{rank}"

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        self.inodes[name] = (NETNS_DIR / name).stat().st_ino

    def create(self, addresses: list[str]) -> None:
        """All namespaces and the bridge first, before any process starts."""
        self._add_namespace(self.bridge_namespace)
        _ip("-n", self.bridge_namespace, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_namespace, "link", "set", "br0", "up")
        for slot, address in enumerate(addresses):
            self.add_node(slot, address)

    def add_node(self, slot: int, address: str) -> None:
        """One node's namespace on the bridge (slot: the rank, or past the ranks for a node
        that replaces one), holding exactly its private IP."""
        namespace = self.node_namespace(slot)
        self._add_namespace(namespace)
        inside, outside = f"{self.prefix}i{slot}", f"{self.prefix}o{slot}"
        self.links += [inside, outside]
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

    def processes(self) -> list[int]:
        """Every live process inside its namespaces: all of them the run's own."""
        return processes_in(set(self.inodes.values()))

    def delete(self) -> list[str]:
        """Deletes every namespace it made (their veths go with them); returns failures,
        among them a namespace that a process still holds after its name is gone."""
        failures = []
        for namespace in reversed(self.created):
            try:
                _ip("netns", "delete", namespace)
            except NamespaceError as error:
                failures.append(str(error))
        self.created.clear()
        # A freed namespace's inode may be given to a new one at once: not ours if named.
        ours = {inode: name for name, inode in self.inodes.items()}
        for inode in named_namespaces():
            ours.pop(inode, None)
        for pid in processes_in(set(ours)):
            name = ours.get(network_namespace(pid) or 0, "?")
            failures.append(f"namespace {name} lives on, deleted: process {pid} is inside it")
        return failures
