"""A small IMDSv2 server: token first (PUT), then metadata with the token (401 without).

moto does not serve instance tags over IMDS, so tests and the rehearsal run this instead.
Tokens live as long as asked (1 to 21600 s, like IMDS), at most `max_token_ttl` (tests make
them short-lived; 0 refuses every token), and an expired or unknown token gets 401.
`mode` injects faults: "no-token-api" (PUT answers 403), "error" (500), "html", "slow".
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import ClassVar

from userdata.spot import NOTICE_PATH

MODES = ("ok", "no-token-api", "error", "html", "slow")
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TTL_SECONDS = 21600


class ImdsStub:
    def __init__(
        self,
        values: dict[str, str],
        host: str = "127.0.0.1",
        port: int = 0,
        mode: str = "ok",
        slow_seconds: float = 5.0,
        max_token_ttl: float | None = None,
        notice_file: str | None = None,
    ) -> None:
        """notice_file: once it exists, its text is the spot notice (spot/instance-action):
        a rehearsal reclaims one node while the others train on."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.values = dict(values)
        self.mode = mode
        self.slow_seconds = slow_seconds
        self.max_token_ttl = max_token_ttl
        self.notice_file = notice_file
        self.tokens: dict[str, float] = {}  # token -> time.monotonic() it expires at
        self.requests: list[tuple[str, str, bool]] = []  # method, path, had a valid token
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 401, as after its TTL."""
        self.tokens.clear()

    def token_valid(self, token: str | None) -> bool:
        return time.monotonic() < self.tokens.get(token or "", 0.0)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version: ClassVar[str] = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(
                self,
                status: int,
                body: str,
                content_type: str = "text/plain",
                headers: dict[str, str] | None = None,
            ) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _fault(self) -> bool:
                if stub.mode == "slow":
                    time.sleep(stub.slow_seconds)
                if stub.mode == "error":
                    self._send(500, "Internal Server Error")
                    return True
                if stub.mode == "html":
                    self._send(200, "<html><body>Captive portal</body></html>", "text/html")
                    return True
                return False

            def do_PUT(self) -> None:
                stub.requests.append(("PUT", self.path, False))
                if self._fault():
                    return
                if stub.mode == "no-token-api" or self.path != "/latest/api/token":
                    self._send(403, "Forbidden")
                    return
                asked = self.headers.get(TTL_HEADER, "")
                if not asked.isdigit() or not 1 <= int(asked) <= MAX_TTL_SECONDS:
                    self._send(400, "Missing or invalid TTL")
                    return
                limit = stub.max_token_ttl
                ttl = int(asked) if limit is None else min(int(asked), limit)
                token = secrets.token_urlsafe(24)
                stub.tokens[token] = time.monotonic() + ttl
                self._send(200, token, headers={TTL_HEADER: f"{ttl:g}"})

            def do_GET(self) -> None:
                valid = stub.token_valid(self.headers.get("X-aws-ec2-metadata-token"))
                stub.requests.append(("GET", self.path, valid))
                if self._fault():
                    return
                if not valid:
                    self._send(401, "Unauthorized")
                    return
                prefix = "/latest/meta-data/"
                key = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                if key == NOTICE_PATH and stub.notice_file:
                    try:
                        stub.values[key] = open(stub.notice_file).read()
                    except OSError:
                        pass
                if key is None or key not in stub.values:
                    self._send(404, "Not Found")
                    return
                self._send(200, stub.values[key])

        return Handler

    def start(self) -> ImdsStub:
        # A short poll: stop() waits for it, and tests start and stop many stubs.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImdsStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def node_values(
    instance_id: str,
    private_ip: str,
    rank: int | str | None,
    num_nodes: int | str | None,
    region: str = "us-east-1",
) -> dict[str, str]:
    """The metadata an EC2 node of the cluster sees; None leaves a tag out."""
    values = {"instance-id": instance_id, "local-ipv4": private_ip, "placement/region": region}
    if rank is not None:
        values["tags/instance/fabric:node-rank"] = str(rank)
    if num_nodes is not None:
        values["tags/instance/fabric:num-nodes"] = str(num_nodes)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve IMDSv2 for one emulated node.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--values", required=True, help="JSON object: metadata path -> value")
    parser.add_argument("--max-token-ttl", type=float, help="seconds a token lives at most")
    parser.add_argument("--notice-file", help="a spot notice, once this file exists")
    args = parser.parse_args()
    values = json.loads(args.values)
    stub = ImdsStub(
        values,
        args.host,
        args.port,
        max_token_ttl=args.max_token_ttl,
        notice_file=args.notice_file,
    ).start()
    print(stub.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
