"""Tasks built on the engine. The CLI finds them here by name."""

from __future__ import annotations

from pvt.engine.task import Task


def get_task(name: str) -> Task:
    """A fresh task object by name (``classification``, ``detection``, ``segmentation``)."""
    if name == "classification":
        from pvt.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name == "detection":
        from pvt.tasks.detection.task import DetectionTask

        return DetectionTask()
    if name == "segmentation":
        from pvt.tasks.segmentation.task import SegmentationTask

        return SegmentationTask()
    raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")


TASKS = ("classification", "detection", "segmentation")
