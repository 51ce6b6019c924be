"""``pvt serve --engine ray``: the same app on Ray Serve replicas (needs the ``ray`` extra).

Each replica builds the model and the app of :func:`pvt.serve.create_app` (``serve.ingress``, the
app made at replica start), so the API, the keys, the limits and the page are those of one
process; batches form per replica with ``serve.batch`` instead of the app's own batcher. Ray's
proxy spreads requests across the replicas, answers 503 when ``--max-queue`` requests already wait
for a replica, and drains replicas on shutdown for ``--grace-s``. ``/metrics`` is the answering
replica's: with several, scrape Ray's own metrics (``ray metrics launch-prometheus``).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray import serve

from pvt.engine.task import Predictor
from pvt.serve.app import ServeOptions, create_app

# What a replica needs to answer: made in the replica (the model is never pickled), by a function
# that can be pickled (a module-level one, or a functools.partial of one).
Build = Callable[[], tuple[Predictor, dict[str, Any]]]
APP_NAME = "pvt"


class Replica:
    """One Ray Serve replica: a model, its batches, the app (``__serve_build_asgi_app__``)."""

    def __init__(self, build: Build, opts: ServeOptions, threads: int) -> None:
        torch.set_num_threads(threads)  # this replica's share of the CPUs Ray gave it
        self.predictor, self.info = build()
        self.opts = opts
        self.info["replica"] = serve.get_replica_context().replica_id.unique_id  # which one answered /v1/model
        batched: Any = self.batched  # serve.batch's wrapper, typed as the plain method
        batched.set_max_batch_size(opts.max_batch)
        batched.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def batched(self, xs: list[torch.Tensor]) -> list[tuple[Any, int, Exception | None]]:
        """One forward for the requests that arrived together; a failing batch is rerun one by one
        so that one bad input fails alone, as the local batcher does."""
        try:
            outs = await asyncio.to_thread(self.predictor.forward, xs)
            return [(out, len(xs), None) for out in outs]
        except Exception:
            answers: list[tuple[Any, int, Exception | None]] = []
            for x in xs:
                try:
                    answers.append(((await asyncio.to_thread(self.predictor.forward, [x]))[0], 1, None))
                except Exception as e:
                    answers.append((None, 1, e))
            return answers

    async def submit(self, x: torch.Tensor) -> tuple[Any, int]:
        out, size, error = await self.batched(x)
        if error is not None:
            raise error
        return out, size

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.predictor, self.info, self.opts, submit=self.submit)


def deployment(build: Build, opts: ServeOptions, replicas: int, cpus_per_replica: float) -> Any:
    """The bound Ray Serve application: ``replicas`` copies of :class:`Replica`."""
    ingress = serve.deployment(
        name="pvt-serve",
        num_replicas=replicas,
        # Enough requests in a replica at once to fill its batches; beyond that they queue in Ray.
        max_ongoing_requests=2 * opts.max_batch,
        max_queued_requests=opts.max_queue if opts.max_queue is not None else -1,
        graceful_shutdown_timeout_s=opts.grace_s,
        ray_actor_options={"num_cpus": cpus_per_replica},
    )(serve.ingress()(Replica))
    return ingress.bind(build, opts, max(1, math.floor(cpus_per_replica)))


def serve_on_ray(build: Build, opts: ServeOptions, replicas: int, address: str | None = None) -> int:
    """Start (or join) Ray, run the replicas behind Ray's HTTP proxy on ``opts.host:opts.port``,
    print ``serving on http://HOST:PORT`` and serve until SIGTERM / Ctrl-C."""
    if replicas < 1:
        raise ValueError(f"--replicas must be at least 1 (got {replicas})")
    port = opts.port or _free_port(opts.host)  # Ray's proxy needs a port named in advance
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # never a cluster found by chance (RAY_ADDRESS): a local instance on the CPUs this process may use
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    try:
        total = ray.cluster_resources().get("CPU", 1.0)
        serve.start(http_options={"host": opts.host, "port": port, "request_timeout_s": opts.timeout_s})
        serve.run(deployment(build, opts, replicas, max(1.0, total // replicas)), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{opts.host}:{port}", flush=True)
        _wait_for_signal()
        print(f"draining: the replicas finish what they hold, at most {opts.grace_s:g} s", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
