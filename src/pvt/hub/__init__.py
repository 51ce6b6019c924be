"""Published PVT weights: the sources table, checked downloads, and ImageNet's class names.

``list_sources`` / ``get_source`` read the table (``pvt.hub.sources``); ``resolve`` turns a row
into a local file (``pvt.hub.download``); ``pvt.create_model(name, pretrained=True)`` uses both.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from pvt.hub.download import (
    ManualDownloadRequired,
    WeightsUnavailable,
    fetch_to,
    is_cached,
    local_path,
    resolve,
    weights_dir,
)
from pvt.hub.sources import SOURCES, EvalTransform, WeightsSource, get_source, list_sources


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class descriptions in the standard (sorted synset) order, e.g. ``"tench,
    Tinca tinca"``: index ``i`` names logit ``i`` of every ImageNet-trained model."""
    text = files("pvt.hub").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    assert len(names) == 1000, f"imagenet_classes.txt holds {len(names)} names, not 1000: reinstall pvt-vision"
    return names


__all__ = [
    "SOURCES",
    "EvalTransform",
    "ManualDownloadRequired",
    "WeightsSource",
    "WeightsUnavailable",
    "fetch_to",
    "get_source",
    "imagenet_classes",
    "is_cached",
    "list_sources",
    "local_path",
    "resolve",
    "weights_dir",
]
