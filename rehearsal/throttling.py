"""An AWS that throttles, as a real account does: calls to chosen services are answered with the
service's own throttling error (SSM's `ThrottlingException: Rate exceeded`, S3's `SlowDown`, ...)
before moto sees them; every call is counted by service, so tests and rehearsals can say what
the control plane cost and how much of it was refused.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

# The services whose throughput is shared per account and region: Parameter Store, CloudWatch
# Logs (their names in a request's SigV4 credential scope).
SHARED_THROUGHPUT = ("ssm", "logs")
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/\d+/[^/]+/([^/]+)/")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Policy = Callable[[str, int], bool]  # (service, its calls so far) -> refuse this one


def service_of(environ: dict[str, Any]) -> str:
    match = _CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
    return match.group(1) if match else "?"


def throttle_answer(service: str, json_protocol: bool) -> tuple[str, list[tuple[str, str]], bytes]:
    """What AWS answers a throttled call, in each protocol."""
    if json_protocol:  # SSM, CloudWatch Logs
        body = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
        return "400 Bad Request", [("Content-Type", "application/x-amz-json-1.1")], body
    if service == "s3":
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
        return "503 Slow Down", [("Content-Type", "application/xml")], body
    if service == "ec2":
        body = (
            b"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit "
            b"exceeded.</Message></Error></Errors><RequestID>r</RequestID></Response>"
        )
        return "503 Service Unavailable", [("Content-Type", "text/xml")], body
    body = (  # CloudFormation (query protocol)
        b"<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded"
        b"</Message></Error><RequestId>r</RequestId></ErrorResponse>"
    )
    return "400 Bad Request", [("Content-Type", "text/xml")], body


def random_share(
    share: float, services: Iterable[str] = SHARED_THROUGHPUT, seed: int = 0
) -> Policy:
    """Refuses `share` of these services' calls, at random (seeded): a busy account."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"a throttled share must be in [0, 1), not {share}")
    chosen, draw = frozenset(services), random.Random(seed)
    return lambda service, _count: service in chosen and draw.random() < share


def every(rules: dict[str, tuple[int, int]]) -> Policy:
    """Of every `period` calls to a service, the first `refused`: {service: (refused, period)}."""

    def refuse(service: str, count: int) -> bool:
        refused, period = rules.get(service, (0, 1))
        return count % period < refused

    return refuse


class Throttle:
    """WSGI middleware in front of moto, refusing the calls its policy says."""

    def __init__(self, app: WsgiApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy
        self.calls: Counter[str] = Counter()  # service -> calls
        self.throttled: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]):
        service = service_of(environ)
        with self._lock:
            refuse = self.policy(service, self.calls[service])
            self.calls[service] += 1
            if refuse:
                self.throttled[service] += 1
        if not refuse:
            return self.app(environ, start_response)
        # The request's body is read all the same: the connection is kept alive.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        status, headers, body = throttle_answer(service, "HTTP_X_AMZ_TARGET" in environ)
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self.calls), Counter(self.throttled)

    def describe(self) -> str:
        calls, throttled = self.snapshot()
        counted = sum(calls[service] for service in SHARED_THROUGHPUT)
        refused = sum(throttled[service] for service in SHARED_THROUGHPUT)
        return f"{refused} of {counted} SSM and CloudWatch Logs calls answered ThrottlingException"


class ThrottledMotoServer(ThreadedMotoServer):
    """moto's threaded server with a Throttle in front; the backends are the process's, so
    several servers (TCP, a unix socket) serve the same emulated account."""

    def __init__(self, ip_address: str, port: int, policy: Policy) -> None:
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.throttle = Throttle(DomainDispatcherApplication(create_backend_app), policy)

    def _server_entry(self) -> None:
        try:
            self._server = make_server(
                self._ip_address,
                self._port,
                self.throttle,
                True,
                request_handler=MotoRequestHandler,
            )
        except (OSError, SystemExit) as error:  # werkzeug exits when it cannot bind; start()
            self.failed = error  # would wait for a server that never comes
            self._server_ready_event.set()
            return
        self._server_ready_event.set()
        self._server.serve_forever()

    def start(self) -> None:
        self.failed: BaseException | None = None
        super().start()
        if self.failed is not None:
            where, failed = self._ip_address, self.failed
            reason = failed if isinstance(failed, OSError) else "the bind failed (reason above)"
            raise RuntimeError(f"the emulated AWS cannot listen on {where}: {reason}")
