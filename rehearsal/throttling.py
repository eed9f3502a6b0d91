"""An AWS that throttles, as a real account does: a share of the calls to the throttled services
(SSM Parameter Store, CloudWatch Logs) is answered `ThrottlingException` ("Rate exceeded")
before moto sees it; every call is counted by operation, so tests and rehearsals can say what
the control plane cost and how much of it was refused.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

# X-Amz-Target prefixes of the JSON-protocol services that throttle per account and region.
THROTTLED_TARGETS = ("AmazonSSM.", "Logs_20140328.")
THROTTLING_BODY = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Throttle:
    """WSGI middleware in front of moto: refuses `share` of the throttled services' calls."""

    def __init__(self, app: WsgiApp, share: float, seed: int = 0) -> None:
        if not 0.0 <= share < 1.0:
            raise ValueError(f"a throttled share must be in [0, 1), not {share}")
        self.app = app
        self.share = share
        self.calls: Counter[str] = Counter()  # operation (e.g. AmazonSSM.GetParameters) -> calls
        self.throttled: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]):
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        with self._lock:
            if target:
                self.calls[target] += 1
            refuse = target.startswith(THROTTLED_TARGETS) and self._random.random() < self.share
            if refuse:
                self.throttled[target] += 1
        if not refuse:
            return self.app(environ, start_response)
        # The request's body is read all the same: the connection is kept alive.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        body = THROTTLING_BODY.encode()
        start_response(
            "400 Bad Request",
            [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(body)))],
        )
        return [body]

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self.calls), Counter(self.throttled)

    def describe(self) -> str:
        calls, throttled = self.snapshot()
        refused = sum(throttled.values())
        counted = sum(calls[t] for t in calls if t.startswith(THROTTLED_TARGETS))
        return f"{refused} of {counted} SSM and CloudWatch Logs calls answered ThrottlingException"


class ThrottledMotoServer(ThreadedMotoServer):
    """moto's threaded server with the Throttle in front; the backends are the process's, so
    two servers (TCP and a unix socket) serve the same emulated account."""

    def __init__(self, ip_address: str, port: int, throttle_share: float, seed: int = 0) -> None:
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.throttle_share = throttle_share
        self.seed = seed
        self.throttle: Throttle | None = None

    def _server_entry(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )

        self.throttle = Throttle(
            DomainDispatcherApplication(create_backend_app), self.throttle_share, self.seed
        )
        self._server = make_server(
            self._ip_address,
            self._port,
            self.throttle,
            True,
            request_handler=MotoRequestHandler,
        )
        self._server_ready_event.set()
        self._server.serve_forever()
