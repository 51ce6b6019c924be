"""``pvt serve``: any task's model behind an HTTP API and a web page (``pvt.serve``)."""

from __future__ import annotations

import argparse
import functools
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
    try:
        from pvt.serve import ServeOptions, create_app, read_keys, serve
        from pvt.serve.security import check_exposure
    except ImportError as e:
        raise ValueError(f"pvt serve needs the serve extra: pip install 'pvt-vision[serve]' ({e})") from e

    opts = ServeOptions(
        args.host, args.port, args.max_batch, args.batch_wait_ms, args.max_upload_mb, args.max_queue,
        args.timeout_s, args.grace_s, read_keys(args.api_key_file), args.insecure_public, args.log_format,
    )  # fmt: skip
    check_exposure(opts.host, opts.api_keys, opts.insecure_public)  # before minutes of model loading
    if args.engine == "ray":
        try:
            from pvt.serve.ray import serve_on_ray
        except ImportError as e:
            raise ValueError(f"pvt serve --engine ray needs the ray extra: pip install 'pvt-vision[ray]' ({e})") from e
        # Each replica builds its own model from the arguments (the model itself is never pickled).
        return serve_on_ray(functools.partial(build_served, args), opts, args.replicas, args.ray_address)
    serve(create_app(*build_served(args), opts), opts)
    return 0


def build_served(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(the task's predictor, ``/v1/model``'s description) for ``pvt serve``'s arguments."""
    from pvt.engine.config import read_yaml
    from pvt.engine.runs import run_config_of
    from pvt.serve import model_info
    from pvt.tasks import whole_model_task

    run_config = run_config_of(args.checkpoint)
    # The task, as the weights' run (or a converted file's header) says; a plain model file classifies.
    task_name = args.task or (read_yaml(run_config).get("task") if run_config is not None else None)
    task, recipe = _recipe(args, task_name or whole_model_task(args.checkpoint) or "classification", None)
    # Compiled precisions compile once per batch shape, on its first request.
    model = _inference_model(args, task, recipe)
    predictor = task.predictor(model, recipe, _artifacts(args))
    return predictor, model_info(task.name, recipe, model, predictor)


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
    g = p.add_argument_group("production")
    g.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="keys, one per line: /v1/* then needs 'Authorization: Bearer KEY' (default: $PVT_API_KEY)",
    )
    g.add_argument(
        "--insecure-public",
        action="store_true",
        help="serve without keys on an address other machines reach (refused otherwise)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="requests waiting for a batch beyond this get 503 + Retry-After (default: 4 x --max-batch, at least 16)",
    )
    g.add_argument("--timeout-s", type=float, default=60.0, help="a request unanswered this long gets 504 (default 60)")
    g.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="on SIGTERM, finish what is in flight for at most this long, then 503 the rest (default 30)",
    )
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="an access log line per request on stderr (default: none)",
    )
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: Ray Serve replicas (needs [ray])",
    )
    g.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --engine ray)")
    g.add_argument("--ray-address", help="a running Ray cluster (default: a local Ray instance)")
    _add_precision_args(p)
    p.set_defaults(func=_cmd_serve)
