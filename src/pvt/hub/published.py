"""Whole published models (detectors, segmenters): their rows in the weights table and local files.

The table's tasks are data sets (``coco``, ``ade20k``); which task package reads which is the
tasks' business (``Task.hub_task``), so this module names none of them.
"""

from __future__ import annotations

from pvt.hub.download import resolve
from pvt.hub.sources import WeightsSource, get_source


def published_source(hub_task: str, backbone: str, tag: bool | str, arch: str | None = None) -> WeightsSource:
    """The ``pvt weights`` row of a published whole model of ``hub_task`` (``coco``, ``ade20k``).

    ``tag`` True (or ``hub_task`` itself) picks the default file (for ``arch`` when given: ``retinanet``,
    ``mask_rcnn``, ``semantic_fpn``); any other tag names a file (of ``arch`` when given).
    """
    default = tag is True or tag == hub_task
    return get_source(backbone, None if default else str(tag), task=hub_task, arch=arch)


def published_checkpoint(hub_task: str, backbone: str, tag: bool | str = True, arch: str | None = None) -> str:
    """The local path of a published whole model (downloaded into the cache when it can be).
    Google-Drive files raise an error that says where to get them and where to put them."""
    return str(resolve(published_source(hub_task, backbone, tag, arch)))
