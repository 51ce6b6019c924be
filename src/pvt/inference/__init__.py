"""Prediction over whole collections: ``pvt.predict`` in Python, the engine behind ``pvt predict``.

>>> for record in pvt.predict("runs/digits/model.safetensors", ["photos/"], batch_size=32, workers=2):
...     print(record["id"], record["top5"][0])

Records come as they are made (memory stays flat however many images); each has the image's
stable ``id`` (its path relative to the input root) beside the task's fields.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from pvt.engine.config import Recipe
from pvt.inference.loading import resolve
from pvt.inference.runner import Options, Summary, run, stream, torchrun
from pvt.inference.sources import Item, collect, read_bytes
from pvt.utils.images import ImageError, decode_image


def predict(
    model: nn.Module | str | os.PathLike[str],
    inputs: str | Sequence[str],
    *,
    task: str | None = None,
    recipe: Recipe | None = None,
    batch_size: int = 8,
    workers: int = 0,
    on_error: str = "stop",
    inputs_from: str | None = None,
    coco_json: str | None = None,
    images: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The record of every image of ``inputs`` (files, folders, ``.tar`` shards), as it is made.

    ``model``: a model object (``pvt.create_model``, ``pvt.detection.retinanet``, ...; ready as it
    is, e.g. from ``pvt.optimize_for_inference``) or a weights file (a run's ``model.safetensors``).
    Images are decoded in ``workers`` processes and run ``batch_size`` at a time, batched only with
    inputs a batch cannot change. ``on_error``: ``stop`` raises ``ImageError`` at the first image
    that cannot be read, ``skip`` warns and goes on.
    """
    owner, built, rec, artifacts = resolve(model, task=task, recipe=recipe)
    predictor = owner.predictor(built, rec, artifacts)
    items = collect([inputs] if isinstance(inputs, str) else inputs, inputs_from=inputs_from,
                    coco_json=coco_json, images=images)  # fmt: skip
    for batch in stream(predictor, items, batch_size=batch_size, workers=workers):
        for r in batch:
            if r.error is not None:
                if on_error == "stop":
                    raise ImageError(r.error)
                warnings.warn(f"skipped {r.error}", stacklevel=2)
            elif r.record is not None:
                yield r.record


def __getattr__(name: str) -> Any:
    """``RayPredictor``, loaded on first use (Ray Data is an optional extra)."""
    if name == "RayPredictor":
        from pvt.inference.ray import RayPredictor

        return RayPredictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ImageError",
    "Item",
    "Options",
    "RayPredictor",
    "Summary",
    "collect",
    "decode_image",
    "predict",
    "read_bytes",
    "resolve",
    "run",
    "stream",
    "torchrun",
]
