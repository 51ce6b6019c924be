"""Which task a model belongs to, and so how it is exported (``Task.export_spec``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pvt.engine.task import ExportSpec


class ExportError(ValueError):
    """A model, input or file that cannot be exported or read back; the message says why and what to do."""


def export_spec(model: nn.Module, recipe: Any = None, artifacts: dict[str, Any] | None = None) -> ExportSpec:
    """How ``model`` is exported, from the task that owns it (``Task.owns_model``), or an ExportError
    naming what is accepted."""
    from pvt.tasks import get_task, task_names

    for name in task_names():
        task = get_task(name)
        if task.owns_model(model):
            return task.export_spec(model, recipe, artifacts or {})
    raise ExportError(
        f"cannot export a {type(model).__name__}: pvt.export takes a model of a registered task "
        f"({', '.join(task_names())}): a PVT classifier or features-only backbone (pvt.create_model), a RetinaNet / "
        "Mask R-CNN (pvt.detection), a Semantic FPN (pvt.segmentation), ..."
    )


def model_kind(model: nn.Module) -> str:
    """The exported file's task: classification | features | detection | segmentation | another task's name."""
    return export_spec(model).kind
