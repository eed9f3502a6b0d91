"""Shared fixtures: an embedded AWS (moto server on 127.0.0.1) started and stopped here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from rehearsal.throttling import ThrottledMotoServer, random_share

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}

# Modules that are slow as a whole (see the `slow` marker in pyproject.toml) but are not marked
# in their own file: their files are another change's, so the mark is given here, by module
# name. A module that can carry its own `pytestmark` belongs there, not in this set.
SLOW_MODULES = frozenset({"test_rehearsal.py"})  # the whole deploy in network namespaces


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup), which take the
# tests in this order, one scope at a time: the longest first, so that both end together.
LONGEST_FIRST = (
    "test_rehearsal.py",
    "test_project_cluster.py",
    "test_local_cluster.py",
    "test_agent.py",
    "test_gpu_check.py",
    "test_trainer.py",
    "test_launch.py",
    "test_install.py",
    "test_boot.py",
)
# Modules whose slow tests share what is costly to make (a project's venv, uv as a node gets
# it): one worker runs them one after the other. Every other slow test is a scope of its own.
SHARED_SLOW = frozenset({"test_project_cluster.py", "test_install.py"})


def _order(item: pytest.Item) -> tuple[int, int]:
    slow = item.get_closest_marker("slow") is not None
    module = item.path.name
    rank = LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)
    return (0 if slow else 1, rank)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        # A fast module is one scope (its module fixtures, a synth, are made once).
        if item.get_closest_marker("slow") is None or item.path.name in SHARED_SLOW:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items.sort(key=_order)  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach AWS or use real credentials, whatever the machine has."""
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


# A share of SSM and CloudWatch Logs calls refused with ThrottlingException, as a busy account
# does; the same emulated account as moto_url (moto's backends belong to the process).
THROTTLED_SHARE = 0.25


@pytest.fixture(scope="session")
def throttled_moto() -> Iterator[ThrottledMotoServer]:
    server = ThrottledMotoServer("127.0.0.1", 0, random_share(THROTTLED_SHARE, seed=19))
    server.start()
    yield server
    server.stop()


def endpoint_env(url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(FAKE_CREDENTIALS)
    env["AWS_ENDPOINT_URL"] = url
    return env


@pytest.fixture
def aws_env(moto_url: str) -> dict[str, str]:
    """The environment of a process whose AWS is the moto server."""
    return endpoint_env(moto_url)


@pytest.fixture
def throttled_aws_env(throttled_moto: ThrottledMotoServer) -> dict[str, str]:
    """The environment of a process whose AWS throttles (THROTTLED_SHARE of SSM calls)."""
    host, port = throttled_moto.get_host_and_port()
    return endpoint_env(f"http://{host}:{port}")


def moto_client(moto_url: str, service: str):
    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def ssm(moto_url: str):
    return moto_client(moto_url, "ssm")


@pytest.fixture
def s3(moto_url: str):
    return moto_client(moto_url, "s3")


@pytest.fixture(scope="session")
def uv_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uv's cache for the tests that install for real, kept between runs under .pytest_cache
    (uv's cache is made to be shared): about 1 GB, cold installs reach PyPI once."""
    cache = getattr(pytestconfig, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return tmp_path_factory.mktemp("uv-cache")
    return Path(cache.mkdir("fabric-install")) / "uv"
