"""Node 0's socket interface, in network namespaces made here: the main address is node 0's
own, which Linux routes through lo; NCCL and gloo must bind the interface that holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from rehearsal.namespaces import namespaces_available
from stacks.config import PROJECT_DIR

REASON = namespaces_available()
pytestmark = [
    pytest.mark.slow,  # makes network namespaces
    pytest.mark.skipif(REASON == "this platform has no network namespaces", reason=str(REASON)),
]
NODE0, NODE1 = "10.251.0.10", "10.251.0.11"  # inside the namespaces only

PROBE = """
import json, sys
from userdata.fabric_command import fabric_environment
from userdata.network import interface_to
found = {}
for address in sys.argv[1:]:
    interface = interface_to(address)
    env = fabric_environment(
        interface=interface, accelerator="gpu", threads=1, rendezvous_timeout=1
    )
    found[address] = [interface, env["NCCL_SOCKET_IFNAME"], env["GLOO_SOCKET_IFNAME"]]
print(json.dumps(found))
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair, each end named eth0 and holding its address;
    nothing is added to the namespace the tests run in."""
    assert REASON is None, REASON
    tag = f"fnt{os.getpid() % 100000}"
    hosts = (f"{tag}-a", f"{tag}-b")
    for host in hosts:
        ip("netns", "add", host)
    try:
        ip("link", "add", f"{tag}a", "netns", hosts[0], "type", "veth", "peer", "name",
           f"{tag}b", "netns", hosts[1])  # fmt: skip
        for host, link, address in ((hosts[0], f"{tag}a", NODE0), (hosts[1], f"{tag}b", NODE1)):
            ip("-n", host, "link", "set", link, "name", "eth0")
            ip("-n", host, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            ip("-n", host, "link", "set", "lo", "up")
        yield hosts
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "delete", host], check=False)


def probe(host: str, *addresses: str) -> dict[str, list[str]]:
    result = subprocess.run(
        ["ip", "netns", "exec", host, sys.executable, "-c", PROBE, *addresses],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_node0_binds_the_interface_that_holds_its_own_address(two_hosts) -> None:
    node0, _ = two_hosts
    found = probe(node0, NODE0)
    assert found[NODE0] == ["eth0", "=eth0", "eth0"]  # not lo: the others dial this address


def test_other_nodes_bind_the_interface_that_routes_to_node0(two_hosts) -> None:
    _, node1 = two_hosts
    assert probe(node1, NODE0)[NODE0] == ["eth0", "=eth0", "eth0"]


def test_a_loopback_main_address_stays_on_lo(two_hosts) -> None:
    """One machine's cluster (the local cluster, agent tests): 127.x lives on lo only."""
    node0, _ = two_hosts
    assert probe(node0, "127.0.0.1")["127.0.0.1"][0] == "lo"
