"""boto3 clients for an AWS that throttles: Parameter Store's and CloudWatch Logs' throughput is
shared by the whole account and region, so a throttled call is retried (botocore's standard
mode: exponential backoff with jitter), never taken for failure.
An endpoint that cannot be reached is another matter: it is given up after a few attempts, so
that a wrong endpoint or a dead network is one clear line within seconds, not minutes."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ConnectionError as AwsConnectionError
from botocore.exceptions import HTTPClientError

MAX_ATTEMPTS = 10  # each call, throttled attempts included
# What AWS answers a throttled call with (botocore's list): ask again later, never a failure.
THROTTLED_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
    }
)
CONNECT_ATTEMPTS = 3


def retries(max_attempts: int = MAX_ATTEMPTS) -> dict[str, Any]:
    """Standard mode: backoff with full jitter, up to 20 s a wait. Not adaptive: its client-side
    rate limit would hold every call of a shared client (the stop watch, a spot notice's stop)
    behind one throttled phase write (AWS calls adaptive mode experimental)."""
    return {"mode": "standard", "total_max_attempts": max_attempts}


def give_up_on_unreachable(
    attempts: int, caught_exception: Exception | None = None, **_: Any
) -> None:
    """A `needs-retry` handler that runs before botocore's: after CONNECT_ATTEMPTS attempts
    that could not reach the endpoint, the error goes to the caller instead of another retry."""
    unreachable = AwsConnectionError | HTTPClientError
    if isinstance(caught_exception, unreachable) and attempts >= CONNECT_ATTEMPTS:
        raise caught_exception  # as botocore does when it gives up


def retrying(client: Any) -> Any:
    """The client, with unreachable endpoints given up after CONNECT_ATTEMPTS attempts."""
    event = f"needs-retry.{client.meta.service_model.service_id.hyphenize()}"
    client.meta.events.register_first(event, give_up_on_unreachable)
    return client


def aws_client(service: str, region: str, timeout: float, connections: int = 10) -> Any:
    """A node's client. Honours AWS_ENDPOINT_URL (boto3 reads it): tests and rehearsals stay
    local. connections: as many as the threads that share it (botocore's default is 10)."""
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries=retries(),
        max_pool_connections=connections,
    )
    return retrying(boto3.client(service, region_name=region, config=config))
