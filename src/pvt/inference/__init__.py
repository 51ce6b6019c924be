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
from pvt.engine.task import Predictor, Task
from pvt.inference.runner import Options, Summary, run, stream, torchrun
from pvt.inference.sources import Item, collect, read_bytes
from pvt.utils.images import ImageError, decode_image


def resolve(
    model: nn.Module | str | os.PathLike[str],
    *,
    task: str | None = None,
    recipe: Recipe | None = None,
    artifacts: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> tuple[Task, nn.Module, Recipe, dict[str, Any]]:
    """(task, model in eval mode, recipe, artifacts) for a model object or a weights file.

    A file is built as ``pvt predict --checkpoint`` builds it (the run's ``config.yaml`` beside it,
    or a converted file's own recipe); a model object is given to the task that owns it, with the
    recipe fields the model implies (its classes, a detector's kind) unless ``recipe`` is given.
    """
    from pvt.engine.config import load_recipe, read_yaml
    from pvt.engine.recipes import recipe_sets, resolve_recipe
    from pvt.engine.runs import artifacts_of, run_config_of
    from pvt.tasks import get_task, task_names, whole_model_task

    if isinstance(model, nn.Module):
        owner = (
            get_task(task) if task else next((t for n in task_names() if (t := get_task(n)).owns_model(model)), None)
        )
        if owner is None:
            raise ValueError(f"{type(model).__name__}: no registered task owns this model; pass task=")
        if recipe is None:
            fields = owner.export_spec(model, None, {}).recipe  # what the model itself says
            recipe = load_recipe(owner.name, owner.data_config, {}, [*recipe_sets(fields), *overrides],
                                 model_cls=owner.model_config)  # fmt: skip
        return owner, model.eval(), recipe, dict(artifacts or {})
    path = str(model)
    config = run_config_of(path)
    name = task or (read_yaml(config).get("task") if config is not None else None) or whole_model_task(path)
    owner = get_task(name or "classification")
    recipe = recipe or resolve_recipe(owner, checkpoint=path, overrides=overrides)
    built = owner.build_model(recipe).eval()
    return owner, built, recipe, dict(artifacts if artifacts is not None else artifacts_of(path))


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


__all__ = [
    "ImageError",
    "Item",
    "Options",
    "Predictor",
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
