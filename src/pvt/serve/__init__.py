"""``pvt serve``: any trained model behind an HTTP API and a web page (needs the ``serve`` extra).

``create_app`` builds the FastAPI app (keys, bounded queue, metrics), ``serve`` runs it on uvicorn
with a bounded graceful shutdown, and ``pvt.serve.ray`` runs the same app on Ray Serve replicas.
"""

from __future__ import annotations

from pvt.serve.app import ServeOptions, create_app, model_info
from pvt.serve.batching import Batcher, Draining, QueueFull
from pvt.serve.security import read_keys
from pvt.serve.server import serve

__all__ = ["Batcher", "Draining", "QueueFull", "ServeOptions", "create_app", "model_info", "read_keys", "serve"]
