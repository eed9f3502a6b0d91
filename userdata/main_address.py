"""The main node's address: the SSM parameter CloudFormation fills with node 0's private IP."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from userdata.errors import AgentError


def parse_ipv4(name: str, value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise AgentError(f"parameter {name} holds {value!r}, not an IPv4 address") from None


def wait_for_main_address(
    ssm: Any,
    name: str,
    timeout: float,
    *,
    first_interval: float = 1.0,
    max_interval: float = 5.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Polls the parameter with backoff until it exists; AgentError past `timeout` seconds."""
    deadline = clock() + timeout
    interval = first_interval
    while True:
        try:
            value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
            return parse_ipv4(name, value)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code != "ParameterNotFound":
                raise AgentError(f"cannot read parameter {name}: {code}: {error}") from None
        except EndpointConnectionError as error:
            raise AgentError(f"SSM unreachable: {error}") from None
        except BotoCoreError as error:
            raise AgentError(f"cannot read parameter {name}: {error}") from None
        left = deadline - clock()
        if left <= 0:
            raise AgentError(
                f"parameter {name} did not appear within {timeout:g} s: the main node "
                "(node 0) never published its address"
            )
        wait = min(interval, left)
        log(
            f"waiting for the main node: {name} not there yet, next look in {wait:.1f} s "
            f"({left:.0f} s left)"
        )
        sleep(wait)
        interval = min(interval * 1.5, max_interval)
