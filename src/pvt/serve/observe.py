"""What the server tells its operators: Prometheus metrics, access logs, and error answers every
client can read.

:class:`Metrics` lives in its own registry (not prometheus-client's global one), so that two apps
in one process count apart. :class:`Observed` is plain ASGI middleware (not Starlette's
``BaseHTTPMiddleware``, which would buffer bodies and hide disconnects from the routes).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# An error answered before the body was read: read and drop up to this much first, as nginx's
# lingering close does, so that a client that sends its whole body before reading (Python's
# urllib, many others) reads the answer instead of a connection reset.
DRAIN_BYTES = 256 << 20
DRAIN_S = 10.0


class Metrics:
    """The server's counters, gauges and histograms, served at ``/metrics``."""

    def __init__(self, queue_depth: Callable[[], float], draining: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pvt_serve_requests", "Requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("pvt_serve_request_duration_seconds", "Time from request to answer, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram("pvt_serve_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.inference = Histogram("pvt_serve_inference_seconds", "Time of one forward pass (one batch)",
                                   buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.rejected = Counter("pvt_serve_rejected", "Predictions not computed, by reason "
                                "(queue_full, timeout, disconnected, draining)", ["reason"], registry=r)  # fmt: skip
        self.in_flight = Gauge("pvt_serve_requests_in_flight", "Requests being handled now", registry=r)
        Gauge("pvt_serve_queue_depth", "Requests waiting for a batch", registry=r).set_function(queue_depth)
        Gauge("pvt_serve_draining", "1 while shutting down", registry=r).set_function(draining)
        self.model = Info("pvt_serve_model", "The model served", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)


class Observed:
    """ASGI middleware: counts and times every request, writes an access log line, and drains an
    unread request body before an error answer."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, routes: set[str], log_format: str | None, log: TextIO = sys.stderr
    ) -> None:
        self.app, self.metrics, self.routes, self.log_format, self.log = app, metrics, routes, log_format, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        body_done = not has_body
        answer: dict[str, Any] = {"status": 500, "bytes": 0, "batch": None}

        async def receive_tracked() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k.lower() == b"x-batch-size":
                        answer["batch"] = int(v)
                # The client waits for "100 Continue" before sending: nothing to drain then.
                if message["status"] >= 400 and not body_done and headers.get("expect", "").lower() != "100-continue":
                    await self._drain(receive_tracked)
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive_tracked, send_tracked)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            status = answer["status"]
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            if self.log_format is not None:
                self._log(scope, status, seconds, answer)

    @staticmethod
    async def _drain(receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        deadline, read = loop.time() + DRAIN_S, 0
        while read < DRAIN_BYTES:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                return
            read += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    def _log(self, scope: Scope, status: int, seconds: float, answer: dict[str, Any]) -> None:
        client = scope.get("client") or ("-", 0)
        path = scope["path"] + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
        if self.log_format == "json":
            entry = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "client": client[0],
                "method": scope["method"],
                "path": path,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "bytes": answer["bytes"],
                "batch": answer["batch"],
            }
            line = json.dumps(entry)
        else:
            line = f'{client[0]} "{scope["method"]} {path}" {status} {answer["bytes"]} {seconds * 1000:.1f}ms'
        print(line, file=self.log, flush=True)
