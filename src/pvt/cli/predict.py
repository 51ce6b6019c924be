"""``pvt predict``: a model over image files, folders, lists, a COCO json's images or tar shards, in
batches, streamed to stdout or into a resumable run folder, sharded under torchrun."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Any

import torch

from pvt.cli.common import (
    _add_allow_nonfinite,
    _add_precision_args,
    _add_pretrained_arg,
    _add_recipe_args,
    _add_runtime_args,
    _artifacts,
    _inference_model,
    _no_precision_for_onnx,
    _recipe,
    _weights_given,
)
from pvt.inference.runner import FORMATS, ON_ERROR, Options, run, torchrun
from pvt.inference.sources import collect


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _manifest(args: argparse.Namespace, task: Any, recipe: Any, model: Any, images: int) -> dict[str, Any]:
    """What produced a run folder: a resumed run must agree on task, model, weights, precision, runtime."""
    import torchvision

    from pvt.version import __version__

    weights = args.model if args.runtime == "onnxruntime" else args.checkpoint
    return {
        "task": task.name,
        "model": getattr(model, "arch", None) or recipe.model.name,
        "weights": weights if weights else f"pretrained: {args.pretrained}",
        "weights_sha256": _digest(weights) if weights else f"pretrained: {args.pretrained}",
        "precision": args.precision or f"recipe (train.amp={recipe.train.amp})",
        "runtime": args.runtime,
        "engine": getattr(args, "engine", "pytorch"),
        "recipe": recipe.to_dict(),
        "inputs": {k: getattr(args, k) for k in ("inputs", "inputs_from", "coco_json", "images")},
        "images": images,
        "versions": {"pvt-vision": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.resume and not args.out:
        raise ValueError("--resume continues a run folder: pass its --out")
    if args.engine == "ray":
        return _predict_ray(args)
    items = collect(args.inputs, inputs_from=args.inputs_from, coco_json=args.coco_json, images=args.images)
    if args.runtime == "onnxruntime":  # an exported file (pvt export) instead of weights
        from pvt.cli.deploy import onnx_predict_setup

        _no_precision_for_onnx(args)
        task, recipe, model, artifacts = onnx_predict_setup(args)
    else:
        task, recipe = _recipe(args, args.task, None)
        _weights_given(recipe)
        model = _inference_model(args, task, recipe)
        artifacts = _artifacts(args)
    dist = torchrun()
    manifest = _manifest(args, task, recipe, model, len(items))
    summary = run(task, task.predictor(model, recipe, artifacts), items, _options(args), manifest, dist)
    if dist.rank == 0:
        where = f"; {', '.join(summary.files)}" if summary.files else ""
        print(f"pvt predict: {summary}{where}", file=sys.stderr, flush=True)
    return 1 if summary.errors else 0


def _options(args: argparse.Namespace) -> Options:
    names = ("batch_size", "workers", "out", "resume", "on_error", "format", "save_pictures")
    return Options(**{name: getattr(args, name) for name in names})  # the flags are the options' fields


def _predict_ray(args: argparse.Namespace) -> int:
    """``--engine ray``: the inputs read by Ray Data and predicted on an actor pool, each actor
    building the model once; the records and the run folder are the pytorch engine's."""
    if args.runtime == "onnxruntime":
        raise ValueError("--engine ray runs the PyTorch model: drop --runtime onnxruntime, or use --engine pytorch")
    if args.save_pictures:
        raise ValueError("--save-pictures is not supported with --engine ray: use --engine pytorch")
    if args.precision == "int8":
        raise ValueError("--precision int8 calibrates on the training split: use --engine pytorch for int8")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--engine ray runs its own actors: start it once, not under torchrun")
    if args.actors < 1:
        raise ValueError(f"--actors {args.actors}: expected >= 1")
    from pvt.inference.ray import run_ray  # Ray is an optional extra, imported only here

    items = collect(args.inputs, inputs_from=args.inputs_from, coco_json=args.coco_json, images=args.images)
    task, recipe = _recipe(args, args.task, None)
    _weights_given(recipe)
    model = task.build_model(recipe)  # the weights checked here, once, before any actor starts
    manifest = _manifest(args, task, recipe, model, len(items))
    del model
    predictor = {
        "checkpoint": args.checkpoint,
        "task": task.name,
        "recipe": recipe.to_dict(),
        "artifacts": _artifacts(args),
        "precision": args.precision,
        "compile": args.compile,
    }
    summary = run_ray(task, items, _options(args), manifest, predictor, address=args.ray_address, actors=args.actors)
    where = f"; {', '.join(summary.files)}" if summary.files else ""
    print(f"pvt predict: {summary}{where}", file=sys.stderr, flush=True)
    return 1 if summary.errors else 0


def add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="predict on images: files, folders, lists, a COCO json's images or tar shards (torchrun-aware)",
        description="Records stream to stdout, or with --out into OUT/predictions.jsonl (errors.jsonl for "
        "images that cannot be read, manifest.json, and the task's derived files); exit status 1 when some "
        "image could not be read.",
    )
    _add_recipe_args(p)
    p.add_argument("--checkpoint", help="weights; a run's config.yaml beside them is used")
    _add_allow_nonfinite(p)
    _add_pretrained_arg(p, "published weights (sets model.pretrained; their transform and class names)")
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) or .tar shards")
    p.add_argument("--inputs-from", metavar="FILE", help="a text file listing inputs, one per line")
    p.add_argument("--coco-json", metavar="FILE", help="predict the images a COCO json lists (no annotations needed)")
    p.add_argument("--images", metavar="DIR", help="the folder --coco-json's file_name values are relative to")
    p.add_argument("--out", help="run folder: predictions.jsonl, errors.jsonl, manifest.json, derived files")
    p.add_argument("--resume", action="store_true", help="skip the images --out already holds; same model required")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (batched only when exact)")
    p.add_argument("--workers", type=int, default=2, help="processes that decode and prepare images (0: none)")
    p.add_argument("--on-error", choices=ON_ERROR, default="skip",
                   help="skip: record unreadable images in errors.jsonl and go on; stop: end at the first")  # fmt: skip
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="parquet: also predictions.parquet")
    p.add_argument("--save-pictures", action="store_true", help="also draw each prediction over its image")
    p.add_argument("--engine", choices=("pytorch", "ray"), default="pytorch",
                   help="ray: read the inputs with Ray Data and predict on a pool of --actors actors")  # fmt: skip
    p.add_argument("--ray-address", metavar="ADDR",
                   help="--engine ray: the Ray cluster to join (inputs and --out at the same paths on every node); "
                   "default: a local instance with this machine's CPUs")  # fmt: skip
    p.add_argument("--actors", type=int, default=1, help="--engine ray: model replicas, one CPU each")
    _add_runtime_args(p)
    _add_precision_args(p)
    p.set_defaults(func=_cmd_predict)


__all__ = ["add_predict"]
