"""Running the app: bind, serve, and shut down within a bound.

On SIGTERM (or Ctrl-C) the server stops accepting connections at once, ``/healthz`` answers
``draining``, and the requests in flight and queued are answered as their batches complete. What
is still waiting when ``grace_s`` runs out is answered 503; then the process exits, with the
signal's status (uvicorn re-raises the signal it caught). A second signal exits at once.
"""

from __future__ import annotations

import socket
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from pvt.serve.app import ServeOptions, ServeState
from pvt.serve.security import check_exposure

# The time given to the 503s of the requests still waiting at the end of the grace to be written.
ANSWER_MARGIN_S = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which already stops accepting and waits for what is in flight; this one
    also reports the drain and bounds it by answering what is left 503."""

    def __init__(self, config: uvicorn.Config, state: ServeState, grace_s: float) -> None:
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self.signalled_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled_at is None and self.state.loop is not None:
            self.signalled_at = time.monotonic()
            batcher = self.state.batcher
            pending = batcher.pending if batcher is not None else 0
            print(f"draining: {pending} requests in flight or queued; at most {self.grace_s:g} s", file=sys.stderr,
                  flush=True)  # fmt: skip
            # A signal handler runs between two bytecodes of the loop's thread: hand over to the loop.
            self.state.loop.call_soon_threadsafe(self.state.start_draining, self.grace_s)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.signalled_at is not None:
            took = time.monotonic() - self.signalled_at
            expired = self.state.expired
            left = f"{expired} still waiting answered 503" if expired else "nothing left unanswered"
            print(f"stopped after draining for {took:.1f} s: {left}", file=sys.stderr, flush=True)


def serve(app: FastAPI, opts: ServeOptions) -> None:
    """Bind, print ``serving on http://HOST:PORT`` (the real port when 0 was asked) and serve
    until a signal."""
    check_exposure(opts.host, opts.api_keys, opts.insecure_public)
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # Nagle's algorithm held each response's second write ~40 ms on keep-alive connections.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((opts.host, opts.port))
    sock.listen(128)  # connections made as soon as the port is printed wait in the backlog
    host = f"[{opts.host}]" if family == socket.AF_INET6 else opts.host
    print(f"serving on http://{host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(opts.grace_s + ANSWER_MARGIN_S + 0.999))  # fmt: skip
    DrainingServer(config, app.state.serve, opts.grace_s).run(sockets=[sock])
