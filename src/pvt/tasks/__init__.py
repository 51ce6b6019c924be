"""The task registry: task name -> ``"module:Class"``, imported on first use.

A task is a plug-in (``pvt.engine.task.Task``): everything that differs per task hangs on its hooks,
so adding one is a package and one ``register_task`` line. The command line, export, serve and the
runtime ask the task object, never its name. Whole models (a detector or segmenter file rather
than a backbone) are recognised and converted here by asking each task whether it claims the file.
"""

from __future__ import annotations

import importlib
import json
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pvt.checkpoint import CheckpointError
from pvt.checkpoint.io import read_keys, save_safetensors
from pvt.engine.config import read_yaml
from pvt.engine.recipes import RECIPE_KEY, paper_recipe
from pvt.engine.runs import RUN_CONFIG
from pvt.engine.task import Task

_REGISTRY: dict[str, str | type[Task]] = {
    "classification": "pvt.classification.task:ClassificationTask",
    "detection": "pvt.detection.task:DetectionTask",
    "segmentation": "pvt.segmentation.task:SegmentationTask",
}


_discovered = False


def _discover() -> None:
    """Tasks other installed packages declare under the ``pvt.tasks`` entry-point group
    (``[project.entry-points."pvt.tasks"] depth = "mypkg.depth:DepthTask"``), read once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group="pvt.tasks"):
        _REGISTRY.setdefault(ep.name, ep.value)


def register_task(name: str, target: str | type[Task]) -> None:
    """Make ``name`` a task of every command: ``target`` is a ``Task`` subclass or ``"module:Class"``
    (imported on first use, so registering costs nothing)."""
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"task {name!r} is already registered as {_REGISTRY[name]!r}")
    _REGISTRY[name] = target


def unregister_task(name: str) -> None:
    """Remove a task registered with ``register_task`` (tests; plug-ins being unloaded)."""
    _REGISTRY.pop(name, None)


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order."""
    _discover()
    return tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """A fresh task object by name (``classification``, ``detection``, ``segmentation``, ...)."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(_REGISTRY)}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
        assert isinstance(target, type) and issubclass(target, Task), f"{_REGISTRY[name]} is not a Task subclass"
    return target()


def __getattr__(name: str) -> Any:
    if name == "TASKS":  # the registered names, as a tuple (reads the registry when asked)
        return task_names()
    raise AttributeError(f"module 'pvt.tasks' has no attribute {name!r}")


def whole_model_task(path: str | os.PathLike[str]) -> str | None:
    """The task of a whole-model file (a detector, a segmenter, ...), or None for a backbone."""
    keys, meta = read_keys(path)
    named = meta.get("task")  # this project's converted files say so in their header
    if named in task_names() and get_task(named).claims_checkpoint(keys, meta):
        return named
    return next((n for n in task_names() if get_task(n).claims_checkpoint(keys, meta)), None)


def published_source(task: str, backbone: str, tag: bool | str, detector: str | None = None) -> Any:
    """The ``pvt weights`` row of a task's published whole model (``pvt.hub.WeightsSource``).

    ``tag`` True (or the weights table's task, ``coco`` / ``ade20k``) picks the default file (for
    ``detector`` when given); any other tag names a file.
    """
    from pvt.hub.published import published_source as source

    t = get_task(task)
    if t.hub_task is None:
        raise ValueError(f"{task} has no published whole models (published backbones: pvt weights)")
    return source(t.hub_task, backbone, tag, t.published_arch({"detector": detector} if detector else {}))


def convert_whole_model(src: str, dst: str, *, allow_nonfinite: bool = False) -> str:
    """Convert a whole model file (mmdetection, mmsegmentation, the authors' or this project's) into
    this project's safetensors with its recipe; returns a report for people.

    The recipe: the papers' preset for a published file (mmdetection's or the authors' models are
    those recipes), a run's own ``config.yaml`` for a file that lies beside one, and none for a
    file of this project's without it (no recipe is better than one that does not fit).
    """
    name = whole_model_task(src)
    if name is None:
        raise CheckpointError(f"{src}: not a whole model of any task ({', '.join(task_names())}); a backbone?")
    task = get_task(name)
    whole = task.read_whole_model(src, allow_nonfinite=allow_nonfinite)
    run_config = Path(src).parent / RUN_CONFIG
    own_recipe = read_yaml(run_config) if run_config.is_file() else None
    recipe = own_recipe if whole.own else paper_recipe(task, whole.model)
    header = {**whole.header, "task": name}
    if recipe is not None:
        header[RECIPE_KEY] = json.dumps(recipe)
    save_safetensors(whole.state_dict, dst, arch=header.pop("arch", None), metadata=header)  # written once
    carried = (
        "with its recipe" if recipe is not None else f"no recipe: pass --preset when using it ({run_config} not found)"
    )
    model = whole.model
    return f"{whole.report}\nwrote {dst} ({name}: {model['name']}, {model['num_classes']} classes, {carried})"


__all__ = [
    "convert_whole_model",
    "get_task",
    "published_source",
    "register_task",
    "task_names",
    "unregister_task",
    "whole_model_task",
]
