"""A model object or a weights file -> what prediction needs: its task, the model in eval mode, the
recipe and the run's artifacts (``pvt.inference.resolve``; its own module so that the Ray engine,
which the package loads lazily, can use it without importing the package)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from pvt.engine.config import Recipe
from pvt.engine.task import Task


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


__all__ = ["resolve"]
