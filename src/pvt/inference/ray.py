"""Prediction on Ray Data: ``RayPredictor`` for ``Dataset.map_batches`` (an actor pool, the model built
once per actor), and ``run_ray``, the engine behind ``pvt predict --engine ray``.

>>> ds = ray.data.from_items([{"id": name, "bytes": data} for name, data in images])
>>> ds = ds.map_batches(pvt.inference.RayPredictor, fn_constructor_kwargs={"checkpoint": "run/model.safetensors"},
...                     batch_size=16, concurrency=2)
>>> records = [json.loads(r["record"]) for r in ds.iter_rows() if r["error"] is None]

Each output row is ``id``, ``record`` (the JSON text of the record ``pvt.predict`` gives, ``"id"``
included; null for an image that could not be predicted) and ``error`` (null, or why), so an
unreadable image never ends an actor. Ray is needed only here: ``pip install 'pvt-vision[ray]'``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import pvt.inference.store as store
from pvt.engine.task import Task
from pvt.inference.runner import (
    FORMATS,
    ON_ERROR,
    Dist,
    Options,
    Progress,
    Summary,
    _display,
    _finish,
    _forward,
    _open_folder,
    _stem,
)
from pvt.inference.sources import Item, read_bytes
from pvt.utils.images import ImageError, decode_image, to_rgb


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ValueError("the Ray engine needs Ray Data: pip install 'pvt-vision[ray]'") from e
    return ray


def _text(value: Any) -> str | None:
    """A non-empty string cell, else None (Ray Data gives an all-null column as NaN floats)."""
    return value if isinstance(value, str) and value else None


def _array_image(a: Any, name: str) -> Image.Image:
    """An HWC (or HW) uint8 array as RGB, alpha over white as ``decode_image`` does."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or 0 in a.shape:
        raise ImageError(f"{name}: not an image array (expected H x W x 1/3/4 uint8, got {a.dtype} {a.shape})")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)))


class RayPredictor:
    """A model's records for batches of images, for ``Dataset.map_batches`` on an actor pool.

    Constructor (``fn_constructor_kwargs``): ``checkpoint``, a weights file (a run's
    ``model.safetensors``, built as ``pvt.inference.resolve`` builds it); ``task`` (default: the
    run's); ``recipe`` (a ``Recipe.to_dict()``: build from it instead of the run's ``config.yaml``;
    without ``checkpoint`` its own weights, e.g. ``model.pretrained``) and ``artifacts`` (class
    names, ...); ``precision`` (fp32 / bf16 / auto, as ``pvt.optimize_for_inference``; int8 needs
    calibration data and is refused) and ``compile``; ``threads``, torch's threads in the actor's
    process (None: left as they are); ``out``, a folder for the files a task writes per image
    (segmentation's label PNGs, named in the record; None: none).

    A batch holds ``id`` (the stable id) and either ``bytes`` (encoded images) or ``image`` (H x W
    x C uint8 arrays); optionally ``name`` (the record's ``image``; default the id), ``index`` (the
    image's position in the run, numbering a detector's ``image_id``; default 0) and ``error`` (a
    reason an earlier step already has, e.g. an unreadable file: the row passes through). Images
    that share the task's group key are run as one forward, so records equal one-by-one ones.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        task: str | None = None,
        recipe: dict[str, Any] | None = None,
        artifacts: dict[str, Any] | None = None,
        precision: str | None = None,
        compile: bool = False,
        threads: int | None = 1,
        out: str | os.PathLike[str] | None = None,
    ) -> None:
        from pvt.inference.loading import resolve

        if threads is not None and threads < 1:
            raise ValueError(f"threads {threads}: expected >= 1")
        if precision == "int8":
            raise ValueError(
                "precision int8 calibrates on the task's training data, which RayPredictor does not read: "
                "use fp32 / bf16 / auto here, or pvt predict --engine pytorch --precision int8"
            )
        if threads is not None:  # the actor's own process: its share of the node's cores
            torch.set_num_threads(threads)
        if checkpoint is None and recipe is None:
            raise ValueError("RayPredictor needs checkpoint= (a weights file) or recipe= (a Recipe.to_dict())")
        built_recipe = None
        if recipe is not None:
            from pvt.engine.config import load_recipe
            from pvt.tasks import get_task

            owner = get_task(task or str(recipe.get("task") or "classification"))
            sets = [] if checkpoint is None else [f"model.checkpoint={checkpoint}", "model.pretrained=false"]
            built_recipe = load_recipe(owner.name, owner.data_config, recipe, sets, model_cls=owner.model_config)
        if checkpoint is not None:
            chosen_task = task if built_recipe is None else built_recipe.task
            self.task, model, self.recipe, arts = resolve(checkpoint, task=chosen_task, recipe=built_recipe,
                                                          artifacts=artifacts)  # fmt: skip
        else:
            assert built_recipe is not None
            self.task, self.recipe, arts = owner, built_recipe, dict(artifacts or {})
            model = owner.build_model(built_recipe).eval()
        if precision is not None or compile:
            from pvt.runtime.precision import optimize_for_inference, resolve_precision

            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            chosen = resolve_precision(precision or "fp32", device)
            model = optimize_for_inference(model, chosen, compile=compile, device=device)
            print(f"precision: {chosen}{' (auto)' if precision == 'auto' else ''}{', compiled' if compile else ''}",
                  file=sys.stderr)  # fmt: skip
        self.model = model
        self.predictor = self.task.predictor(model, self.recipe, arts)
        self.out = None if out is None else Path(out)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ids = [str(i) for i in batch["id"]]
        n = len(ids)
        if "bytes" not in batch and "image" not in batch:
            raise ValueError(f"RayPredictor: a batch needs an 'id' column and 'bytes' or 'image'; got {sorted(batch)}")
        names = [str(v) for v in batch["name"]] if "name" in batch else ids
        indexes = [int(v) for v in batch["index"]] if "index" in batch else [0] * n
        prior = [_text(v) for v in batch["error"]] if "error" in batch else [None] * n
        records: list[str | None] = [None] * n
        errors: list[str | None] = list(prior)
        buckets: dict[Hashable, list[tuple[int, Item, torch.Tensor]]] = {}
        for k in range(n):
            if errors[k] is not None:
                continue
            try:
                if "bytes" in batch:
                    image = decode_image(bytes(batch["bytes"][k] or b""), ids[k])
                else:
                    image = _array_image(batch["image"][k], ids[k])
                x = self.predictor.prepare(image)
            except ImageError as e:
                errors[k] = str(e)
                continue
            item = Item(indexes[k], ids[k], names[k])  # its display name is its path
            buckets.setdefault(self.predictor.group_key(x), []).append((k, item, x))
        for group in buckets.values():
            results = _forward(self.predictor, [(item, x) for _, item, x in group])
            for (k, _, _), r in zip(group, results, strict=True):
                if r.record is None:
                    errors[k] = r.error
                    continue
                if self.out is not None:
                    assert r.x is not None
                    r.record.update(self.predictor.write_files(self.out, _stem(ids[k]), r.x, r.output, False))
                records[k] = json.dumps(r.record)
        return {"id": ids, "record": records, "error": errors}


def _read_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A Ray Data step: the encoded image of each (path, tar member) row, or why it cannot be read."""
    data: list[bytes] = []
    errors: list[str] = []
    for item_id, path, member in zip(batch["id"], batch["path"], batch["member"], strict=True):
        try:
            data.append(read_bytes(Item(0, str(item_id), str(path), _text(member))))
            errors.append("")
        except OSError as e:
            data.append(b"")
            errors.append(f"{item_id}: cannot read the file ({e})")
    return {"id": batch["id"], "name": batch["name"], "index": batch["index"], "bytes": data, "error": errors}


def _start(address: str | None) -> bool:
    """Ray for this run: the one this process is already connected to, ``address``'s cluster, or
    a new local instance with every CPU of this machine. True when this call started it."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:  # never a running cluster found by chance (RAY_ADDRESS): a local instance of our own
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    return True


def run_ray(
    task: Task,
    items: Sequence[Item],
    options: Options,
    manifest: dict[str, Any],
    predictor: dict[str, Any],
    *,
    address: str | None = None,
    actors: int = 1,
) -> Summary:
    """``run`` on Ray Data: ``items`` read in Ray tasks, predicted by ``actors`` ``RayPredictor``
    actors (``predictor``: their constructor's keywords), records written by this process into
    the same run folder (journals, manifest, resume, derived files) or to stdout.

    ``address``: a Ray cluster to connect to (inputs and ``options.out`` must then be at the same
    paths on every node); None: the Ray this process already has, else a local instance.
    """
    if options.on_error not in ON_ERROR or options.format not in FORMATS:
        raise ValueError(f"--on-error {options.on_error} / --format {options.format}: expected {ON_ERROR} / {FORMATS}")
    if options.save_pictures:
        raise ValueError("--save-pictures is not supported with --engine ray: use --engine pytorch")
    if actors < 1 or options.batch_size < 1:
        raise ValueError(f"--actors {actors} / --batch-size {options.batch_size}: expected >= 1")
    out = Path(options.out) if options.out else None
    done = _open_folder(out, options, manifest, Dist()) if out is not None else set()
    todo = [it for it in items if it.id not in done]
    summary = Summary(skipped=len(items) - len(todo))
    start = time.perf_counter()
    if todo:
        started = _start(address)
        try:
            _predict(todo, options, out, predictor, address, actors, summary)
        finally:
            if started:
                _import_ray().shutdown()
    summary.seconds = time.perf_counter() - start
    if out is not None:
        summary.files = [str(p) for p in _finish(task, out, options)]
    return summary


def _predict(
    todo: list[Item],
    options: Options,
    out: Path | None,
    predictor: dict[str, Any],
    address: str | None,
    actors: int,
    summary: Summary,
) -> None:
    ray = _import_ray()
    from ray.data import ActorPoolStrategy, DataContext

    cpus = int(ray.cluster_resources().get("CPU", 0))
    if actors > cpus:
        raise ValueError(f"--actors {actors}: the Ray cluster has {cpus} CPUs, one for each actor")
    kwargs = {"threads": max(1, cpus // actors) if address is None else 1, **predictor}
    if out is not None:  # the actors write the task's per-image files, named as the pytorch engine names them
        kwargs["out"] = str(out) if address is None else str(out.resolve())
    rows = [
        {
            "id": it.id,
            "path": os.path.abspath(it.path),
            "member": it.member or "",
            "name": _display(it),
            "index": it.coco_id - 1 if it.coco_id is not None else it.index,  # record() numbers from 1
        }
        for it in todo
    ]
    context = DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False  # this process reports progress itself
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(_read_batch, batch_size=options.batch_size, batch_format="numpy")
    ds = ds.map_batches(RayPredictor, fn_constructor_kwargs=kwargs, batch_size=options.batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=actors))  # fmt: skip
    predictions = store.Journal(store.journal_path(out, store.PREDICTIONS)) if out else None
    errors = store.Journal(store.journal_path(out, store.ERRORS)) if out else None
    shown = {it.id: _display(it) for it in todo}
    progress = Progress(len(todo), options.progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            good: list[dict[str, Any]] = []
            bad: list[dict[str, Any]] = []
            for item_id, record, error in zip(batch["id"], batch["record"], batch["error"], strict=True):
                reason, text = _text(error), _text(record)
                if reason is not None or text is None:
                    bad.append({"id": str(item_id), "image": shown[str(item_id)], "error": reason or "no record"})
                else:
                    good.append(json.loads(text))
            if bad and options.on_error == "stop":
                raise ImageError(f"{bad[0]['error']} (--on-error skip records such images and goes on)")
            if predictions is not None and errors is not None:
                predictions.write(good)
                errors.write(bad)
            else:
                for r in good:
                    print(json.dumps(r), flush=True)
                for b in bad:
                    print(f"pvt predict: skipped {b['error']}", file=sys.stderr, flush=True)
            summary.images += len(good)
            summary.errors += len(bad)
            progress.update(len(good) + len(bad))
    finally:
        context.enable_progress_bars = bars
        progress.close()
        for journal in (predictions, errors):
            if journal is not None:
                journal.close()


__all__ = ["RayPredictor", "run_ray"]
