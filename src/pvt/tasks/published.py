"""Deprecated: whole published models moved to ``pvt.tasks`` (conversion, rows), ``pvt.hub.published``
and ``pvt.engine.recipes``; these aliases, with their old signatures, go in the next release."""

from __future__ import annotations

import warnings
from typing import Any

from pvt.engine import recipes as _recipes
from pvt.engine.recipes import RECIPE_KEY, recipe_of
from pvt.hub.download import resolve
from pvt.tasks import convert_whole_model, get_task, published_source, whole_model_task

warnings.warn(
    "pvt.tasks.published moved to pvt.tasks, pvt.hub.published and pvt.engine.recipes", DeprecationWarning, stacklevel=2
)

HUB_TASK = {"detection": "coco", "segmentation": "ade20k"}


def published_checkpoint(task: str, backbone: str, tag: bool | str = True, detector: str | None = None) -> str:
    return str(resolve(published_source(task, backbone, tag, detector)))


def paper_recipe(task: str, model: dict[str, Any]) -> dict[str, Any]:
    return _recipes.paper_recipe(get_task(task), model)


def published_recipe(task: str, backbone: str, tag: bool | str, overrides: list[str]) -> dict[str, Any]:
    return _recipes.published_recipe(get_task(task), backbone, tag, overrides)


__all__ = [
    "HUB_TASK",
    "RECIPE_KEY",
    "convert_whole_model",
    "paper_recipe",
    "published_checkpoint",
    "published_recipe",
    "published_source",
    "recipe_of",
    "whole_model_task",
]
