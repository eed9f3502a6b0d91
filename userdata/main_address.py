"""The main node's address: the SSM parameter CloudFormation fills with node 0's private IP,
read once this instance is one of the cluster's members (during a redeploy the parameter may
still hold the old node 0's address until CloudFormation has made every new node)."""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from userdata.aws_clients import THROTTLED_CODES
from userdata.cluster_control import parse_members
from userdata.errors import AgentError
from userdata.generations import MISSING, NOT_PUBLISHED


def parse_ipv4(name: str, value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise AgentError(f"parameter {name} holds {value!r}, not an IPv4 address") from None


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def wait_for_main_address(
    ssm: Any,
    name: str,
    timeout: float,
    *,
    members_parameter: str = "",
    instance: str = "",
    rank: int = 0,
    first_interval: float = 1.0,
    max_interval: float = 10.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Polls (one GetParameters call a look, jittered backoff) until the main address exists
    and, with members_parameter, this instance holds `rank` in it; AgentError past `timeout`
    seconds. Throttling only delays the next look."""
    deadline = clock() + timeout
    interval = first_interval
    names = [name, *([members_parameter] if members_parameter else [])]
    while True:
        why = ""
        try:
            answer = ssm.get_parameters(Names=names)
            found = {p["Name"]: p["Value"] for p in answer.get("Parameters", [])}
            members = parse_members(found[members_parameter]) if members_parameter in found else []
            if name not in found or found[name] == NOT_PUBLISHED:
                why = f"{name} not there yet"
            elif members_parameter and MISSING in members:
                missing = [rank for rank, member in enumerate(members) if member == MISSING]
                why = f"a replacement is launching for rank(s) {missing}"
            elif members_parameter and instance not in members:
                why = f"this instance {instance} is not yet among {members_parameter}"
            elif members_parameter and members.index(instance) != rank:
                raise AgentError(
                    f"{members_parameter} puts this instance {instance} at rank "
                    f"{members.index(instance)}, but its tag says {rank}"
                )
            else:
                return parse_ipv4(name, found[name])
        except ClientError as error:
            code = error_code(error)
            if code not in THROTTLED_CODES:
                raise AgentError(f"cannot read parameter {name}: {code}: {error}") from None
            why = f"SSM throttled the look ({code})"
        except EndpointConnectionError as error:
            raise AgentError(f"SSM unreachable: {error}") from None
        except BotoCoreError as error:
            raise AgentError(f"cannot read parameter {name}: {error}") from None
        left = deadline - clock()
        if left <= 0:
            if why.startswith("this instance"):
                raise AgentError(f"{why} after {timeout:g} s: this node belongs to another deploy")
            raise AgentError(
                f"parameter {name} did not appear within {timeout:g} s: the main node "
                "(node 0) never published its address"
            )
        wait = min(interval * random.uniform(0.5, 1.0), left)
        log(f"waiting for the main node: {why}, next look in {wait:.1f} s ({left:.0f} s left)")
        sleep(wait)
        interval = min(interval * 1.5, max_interval)
