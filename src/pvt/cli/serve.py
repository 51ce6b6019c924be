"""``pvt serve``: any task's model behind an HTTP API and a web page (``pvt.serve``)."""

from __future__ import annotations

import argparse
from typing import Any

from pvt.cli.common import (
    _add_allow_nonfinite,
    _add_precision_args,
    _artifacts,
    _inference_model,
    _recipe,
)
from pvt.tasks import task_names


def _cmd_serve(args: argparse.Namespace) -> int:
    """The model of any task behind an HTTP API and a web page (pvt.serve)."""
    from pvt.engine.config import read_yaml
    from pvt.engine.runs import run_config_of
    from pvt.tasks import whole_model_task

    try:
        from pvt.serve import ServeOptions, serve
    except ImportError as e:
        raise ValueError(f"pvt serve needs the serve extra: pip install 'pvt-vision[serve]' ({e})") from e

    run_config = run_config_of(args.checkpoint)
    # The task, as the weights' run (or a converted file's header) says; a plain model file classifies.
    task_name = args.task or (read_yaml(run_config).get("task") if run_config is not None else None)
    task, recipe = _recipe(args, task_name or whole_model_task(args.checkpoint) or "classification", None)
    # Compiled precisions compile once per batch shape, on its first request.
    model = _inference_model(args, task, recipe)
    opts = ServeOptions(args.host, args.port, args.max_batch, args.batch_wait_ms, args.max_upload_mb)
    serve(task.name, recipe, model, task.predictor(model, recipe, _artifacts(args)), opts)
    return 0


def add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP: a JSON API and a web page (needs [serve])")
    p.add_argument("--checkpoint", required=True, help="weights; a run's config.yaml beside them is used")
    p.add_argument("--task", choices=task_names(), help="default: the run's config.yaml, or the file's own")
    p.add_argument("--preset", help="a shipped preset name or a recipe YAML path (default: the run's config.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, repeatable")
    _add_allow_nonfinite(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the chosen one is printed)")
    p.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for batch-mates")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused with 413")
    _add_precision_args(p)
    p.set_defaults(func=_cmd_serve)
