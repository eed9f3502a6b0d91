"""IMDSv2: who this node is (instance id, region, private IP) and its rank from instance tags."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

from userdata.errors import AgentError

DEFAULT_ENDPOINT = "http://169.254.169.254"
TAG_NODE_RANK = "fabric:node-rank"
TAG_NUM_NODES = "fabric:num-nodes"
# On each rank's Auto Scaling group (recover), not its instances: the stack's name. Node 0 finds
# the groups by it, and the node role may scale only the groups that carry its own stack's.
TAG_CLUSTER = "fabric:cluster"
MAX_NODES = 64
TOKEN_TTL_SECONDS = 21600  # the most IMDS grants
RENEW_MARGIN_SECONDS = 60.0
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


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


class ImdsUnauthorized(AgentError):
    """HTTP 401: the token expired or was revoked (from `get`: even a brand-new one)."""


class Imds:
    """An IMDSv2 client that keeps its token alive: tokens live at most 6 hours, after which
    IMDS answers 401 to everything (a long run would stop seeing spot notices)."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 2.0,
        token_ttl: int = TOKEN_TTL_SECONDS,
    ) -> None:
        self.base_url = (base_url or endpoint()).rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() after which the token is renewed first
        self._lock = threading.Lock()  # the spot watcher thread shares this client

    def _open(self, request: urllib.request.Request, what: str) -> tuple[str, Message]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read().decode("utf-8", errors="replace")
                headers = response.headers
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise KeyError(what) from None
            message = f"IMDS at {self.base_url} answered HTTP {error.code} for {what}"
            raise (ImdsUnauthorized if error.code == 401 else AgentError)(message) from None
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise AgentError(f"IMDS at {self.base_url} unreachable for {what}: {reason}") from None
        if "html" in headers.get("Content-Type", "") or body.lstrip().startswith("<"):
            raise AgentError(f"IMDS at {self.base_url} answered HTML, not a value, for {what}")
        return body.strip(), headers

    def _new_token(self) -> str:
        asked_at = time.monotonic()  # IMDS starts the token's clock later, never sooner
        request = urllib.request.Request(
            f"{self.base_url}/latest/api/token",
            method="PUT",
            headers={TTL_HEADER: str(self.token_ttl)},
        )
        try:
            token, headers = self._open(request, "an IMDSv2 token")
        except KeyError:
            raise AgentError(f"IMDS at {self.base_url} has no IMDSv2 token API") from None
        ttl = float(self.token_ttl)
        try:  # IMDS says how long it granted; trust it if shorter than asked
            ttl = min(ttl, float(headers.get(TTL_HEADER, "")))
        except ValueError:
            pass
        # Renew with a margin, so a request sent just before expiry does not arrive after it.
        self._renew_at = asked_at + ttl - min(RENEW_MARGIN_SECONDS, ttl / 10)
        return token

    def token(self, fresh: bool = False) -> str:
        """The current token, renewed when it nears its expiry (or when `fresh`)."""
        with self._lock:
            if fresh or self._token is None or time.monotonic() >= self._renew_at:
                self._token = self._new_token()
            return self._token

    def _get(self, path: str, token: str) -> str:
        request = urllib.request.Request(
            f"{self.base_url}/latest/meta-data/{path}",
            headers={"X-aws-ec2-metadata-token": token},
        )
        return self._open(request, path)[0]

    def get(self, path: str) -> str:
        """A metadata value; KeyError when IMDS says it does not exist (404)."""
        try:
            return self._get(path, self.token())
        except ImdsUnauthorized:
            # The token expired or was revoked behind our back: one retry with a new one.
            return self._get(path, self.token(fresh=True))

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
