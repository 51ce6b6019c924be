"""Recipes and their resolution: the papers' recipe of a published whole model, the recipe a converted
file carries, and ``resolve_recipe`` (preset or run config <- published recipe <- flags <- ``--set``),
the one function the command line, export and serve call."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pvt.checkpoint.io import read_keys
from pvt.engine.config import Recipe, load_recipe
from pvt.engine.presets import list_presets, load_preset
from pvt.engine.runs import run_config_of
from pvt.engine.task import Task

RECIPE_KEY = "recipe"  # a converted whole model's recipe, as JSON in its safetensors header


def paper_recipe(task: Task, model: dict[str, Any]) -> dict[str, Any]:
    """The papers' preset for this whole model (``model``: its recipe's model section), that section
    updated. Models without a shipped preset get the task's defaults with just ``model``."""
    name = task.paper_preset(model)
    recipe = load_preset(task.name, name) if name is not None and name in list_presets(task.name) else {}
    recipe.setdefault("model", {}).update(model)
    return recipe


def recipe_of(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recipe a converted file carries (see ``pvt.tasks.convert_whole_model``), or None."""
    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return None
    _, meta = read_keys(path)
    text = meta.get(RECIPE_KEY)
    return json.loads(text) if text else None


def published_recipe(task: Task, backbone: str, tag: bool | str, overrides: Sequence[str]) -> dict[str, Any]:
    """The papers' recipe for a published whole model (``pvt predict detection --pretrained coco``)."""
    from pvt.hub.published import published_source

    assert task.hub_task is not None, f"{task.name} has no published whole models"
    flags = {o.split("=", 1)[0][len("model.") :]: o.split("=", 1)[1] for o in overrides if o.startswith("model.")}
    source = published_source(task.hub_task, backbone, tag, task.published_arch(flags))
    model: dict[str, Any] = {"name": backbone, "num_classes": source.num_classes}
    model.update(task.published_model_fields(source))
    return paper_recipe(task, model)


def recipe_sets(fields: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``--set`` overrides (``section.key=JSON``) for recipe fields given as ``{section: {key: value}}``
    (an exported file's ``recipe`` metadata, or ``Task.export_spec(...).recipe``)."""
    return [f"{s}.{k}={json.dumps(v)}" for s, section in fields.items() for k, v in section.items()]


def resolve_recipe(
    task: Task,
    *,
    training: bool = False,
    preset: str | None = None,
    default_preset: str | None = None,
    checkpoint: str | None = None,
    pretrained: bool | str | None = None,
    data: str | None = None,
    model: str | None = None,
    allow_nonfinite: bool = False,
    overrides: Sequence[str] = (),
) -> Recipe:
    """The recipe a command runs: the preset (else the run's own ``config.yaml`` beside
    ``checkpoint``, a converted file's carried recipe, a published whole model's papers' recipe, or
    ``default_preset``) <- the shorthand flags (``data``, ``model``, ``checkpoint``, ``pretrained``,
    ``allow_nonfinite``) <- ``overrides`` (``key=value``, as ``--set``).

    ``training``: a dense task's ``pretrained`` then means its published ImageNet backbone, not
    the published whole model.
    """
    if checkpoint and pretrained is not None:
        raise ValueError("pass either --checkpoint FILE or --pretrained [TAG], not both")
    if preset is None and (run_config := run_config_of(checkpoint)) is not None:
        preset = str(run_config)
    chosen = preset or default_preset
    base = load_preset(task.name, chosen) if chosen else {}
    if preset is None and task.hub_task is not None:
        # A converted whole model carries its recipe; a published one gets the papers' recipe.
        if checkpoint:
            base = recipe_of(checkpoint) or base
        elif pretrained is not None and not training:
            base = published_recipe(task, model or "pvt_small", pretrained, overrides)
    sets = list(overrides)
    if data:
        sets.append(f"data.root={data}")
    if model:
        sets.append(f"model.name={model}")
    if allow_nonfinite:
        sets.append("model.allow_nonfinite=true")
    if checkpoint:
        sets.append(f"model.checkpoint={checkpoint}")
        # A run's config.yaml may say it started from published weights; these weights replace them.
        sets.append("model.pretrained=false")
    if pretrained is not None:
        # Training a detector / segmenter starts from the published ImageNet backbone; evaluating
        # or predicting means the published whole model.
        key = "model.backbone_pretrained" if training and task.hub_task is not None else "model.pretrained"
        sets.append(f"{key}={'true' if pretrained is True else pretrained}")
    return load_recipe(task.name, task.data_config, base, sets, model_cls=task.model_config)
