"""``pvt serve``: any trained model behind an HTTP API and a web page (needs the ``serve`` extra)."""

from __future__ import annotations

from pvt.serve.app import ServeOptions, create_app, model_info, serve
from pvt.serve.batching import Batcher

__all__ = ["Batcher", "ServeOptions", "create_app", "model_info", "serve"]
