"""IMDSv2: who this node is (instance id, region, private IP) and its rank from instance tags."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from userdata.errors import AgentError

DEFAULT_ENDPOINT = "http://169.254.169.254"
TAG_NODE_RANK = "fabric:node-rank"
TAG_NUM_NODES = "fabric:num-nodes"
MAX_NODES = 64
TOKEN_TTL_SECONDS = 21600


@dataclass(frozen=True)
class NodeIdentity:
    instance_id: str
    region: str
    private_ip: str
    node_rank: int
    num_nodes: int


def endpoint() -> str:
    """The IMDS base URL; AWS_EC2_METADATA_SERVICE_ENDPOINT points it elsewhere (tests)."""
    return os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


class Imds:
    def __init__(self, base_url: str | None = None, timeout: float = 2.0) -> None:
        self.base_url = (base_url or endpoint()).rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _open(self, request: urllib.request.Request, what: str) -> str:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8", errors="replace")
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise KeyError(what) from None
            raise AgentError(
                f"IMDS at {self.base_url} answered HTTP {error.code} for {what}"
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise AgentError(f"IMDS at {self.base_url} unreachable for {what}: {reason}") from None
        if "html" in content_type or body.lstrip().startswith("<"):
            raise AgentError(f"IMDS at {self.base_url} answered HTML, not a value, for {what}")
        return body.strip()

    def token(self) -> str:
        if self._token is None:
            request = urllib.request.Request(
                f"{self.base_url}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
            )
            try:
                self._token = self._open(request, "an IMDSv2 token")
            except KeyError:
                raise AgentError(f"IMDS at {self.base_url} has no IMDSv2 token API") from None
        return self._token

    def get(self, path: str) -> str:
        """A metadata value; KeyError when IMDS says it does not exist (404)."""
        request = urllib.request.Request(
            f"{self.base_url}/latest/meta-data/{path}",
            headers={"X-aws-ec2-metadata-token": self.token()},
        )
        return self._open(request, path)

    def require(self, path: str, hint: str = "") -> str:
        try:
            return self.get(path)
        except KeyError:
            raise AgentError(f"IMDS has no {path}{hint}") from None


def _tag_integer(imds: Imds, key: str, low: int, high: int) -> int:
    hint = " (is the tag set and are instance metadata tags enabled?)"
    value = imds.require(f"tags/instance/{key}", hint)
    if not value.isdigit() or not low <= int(value) <= high:
        raise AgentError(f"instance tag {key}={value!r} is not an integer from {low} to {high}")
    return int(value)


def read_identity(imds: Imds) -> NodeIdentity:
    num_nodes = _tag_integer(imds, TAG_NUM_NODES, 1, MAX_NODES)
    return NodeIdentity(
        instance_id=imds.require("instance-id"),
        region=imds.require("placement/region"),
        private_ip=imds.require("local-ipv4"),
        node_rank=_tag_integer(imds, TAG_NODE_RANK, 0, num_nodes - 1),
        num_nodes=num_nodes,
    )
