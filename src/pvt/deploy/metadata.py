"""What an exported file says about itself: input name, layout and range, outputs, class names, the
preprocessing, and the recipe settings ``pvt predict`` / ``pvt eval`` rebuild the same pipeline from.

Stored as JSON values under ``pvt.<key>`` ONNX metadata_props (``onnxruntime``'s
``session.get_modelmeta().custom_metadata_map``) or in ``pvt_metadata.json`` of a ``.pt2`` archive.
The task-specific parts come from the model's task (``Task.export_spec``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pvt.deploy.spec import export_spec
from pvt.engine.recipes import recipe_sets
from pvt.engine.task import ExportSpec
from pvt.version import __version__


def describe(
    model: nn.Module,
    *,
    size: tuple[int, int],
    recipe: Any = None,
    artifacts: dict[str, Any] | None = None,
    spec: ExportSpec | None = None,
) -> dict[str, Any]:
    """The metadata of ``model`` exported at ``size``. ``recipe``: the ``pvt.engine`` recipe it was
    built from (its evaluation transform and test-time settings), else the model's published
    transform or the papers' defaults. ``artifacts``: a run's ``task.json``. ``spec``: the model's
    ``ExportSpec`` when already made (``pvt.deploy.export_spec``)."""
    if spec is None:
        spec = export_spec(model, recipe, artifacts)
    arch = getattr(model, "arch", None) or type(model).__name__
    class_names = getattr(model, "class_names", None)
    meta: dict[str, Any] = {
        "format": "pvt-vision export 1",
        "producer": f"pvt-vision {__version__}",
        "task": spec.kind,
        "arch": arch,
        "size": list(size),
        "classes": spec.classes,
        "artifacts": artifacts or {},
        "class_names": list(class_names) if isinstance(class_names, tuple) else class_names,
    }
    meta.update(spec.metadata)
    if spec.recipe:  # what pvt predict / eval --runtime onnxruntime set in their recipe
        meta["recipe"] = spec.recipe
    return meta


def recipe_overrides(meta: dict[str, Any]) -> list[str]:
    """``--set`` overrides that give a recipe the exported model's classes and preprocessing."""
    return recipe_sets(meta.get("recipe") or {})


__all__ = ["describe", "recipe_overrides"]
