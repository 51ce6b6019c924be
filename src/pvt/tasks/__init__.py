"""Tasks built on the engine. The CLI finds them here by name."""

from __future__ import annotations

from pvt.engine.task import Task


def get_task(name: str) -> Task:
    """A fresh task object by name (``classification``)."""
    if name == "classification":
        from pvt.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name == "detection":
        from pvt.tasks.detection.task import DetectionTask

        return DetectionTask()
    raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")


TASKS = ("classification", "detection")
