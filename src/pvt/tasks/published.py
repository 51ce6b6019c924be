"""Whole published models: find a detector's or segmenter's published file, and convert any whole
model into this project's safetensors together with the recipe it was trained with.

A converted file carries its recipe (the papers' preset for that detector / segmenter and backbone,
with the file's class count and test-time semantics) as JSON in the safetensors header, so
``pvt eval detection --checkpoint converted.safetensors --data /data/coco`` needs nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from pvt.checkpoint import CheckpointError
from pvt.checkpoint.io import read_checkpoint_object, save_safetensors
from pvt.checkpoint.layouts import strip_module_prefix, unwrap

HUB_TASK = {"detection": "coco", "segmentation": "ade20k"}
RECIPE_KEY = "recipe"


def published_checkpoint(task: str, backbone: str, tag: bool | str = True, detector: str | None = None) -> str:
    """The local path of a published whole model (downloaded into the cache when it can be).

    ``task``: ``detection`` or ``segmentation``; ``detector``: ``retinanet`` or ``mask_rcnn``;
    ``tag``: True for the default file, or a tag of ``pvt weights`` (``coco``,
    ``coco-official``, ``ade20k-official``, ...). Google-Drive files raise an error that says where
    to get them and where to put them.
    """
    from pvt.hub import resolve

    return str(resolve(published_source(task, backbone, tag, detector)))


def _keys(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, str]]:
    """Tensor names and header metadata of a checkpoint file (safetensors: without reading tensors)."""
    if str(path).endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys()), dict(f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-export it") from e
    sd, _ = strip_module_prefix(unwrap(read_checkpoint_object(path), str(path)))
    return list(sd), {}


def whole_model_task(path: str | os.PathLike[str]) -> str | None:
    """``detection`` / ``segmentation`` for a whole detector / segmenter file, None for a backbone."""
    keys, meta = _keys(path)
    if meta.get("task") in HUB_TASK:
        return meta["task"]
    if any(k.startswith("decode_head.") for k in keys) or "head.classifier.weight" in keys:
        return "segmentation"
    det = ("bbox_head.", "rpn_head.", "roi_head.", "head.classification_head.", "roi_heads.")
    if any(k.startswith(det) for k in keys):
        return "detection"
    return None


def paper_recipe(task: str, model: dict[str, Any]) -> dict[str, Any]:
    """The papers' preset for this detector / segmenter and backbone, its ``model`` section updated.

    Backbones without a shipped preset get the task's defaults with just ``model``.
    """
    from pvt.engine.presets import list_presets, load_preset

    if task == "detection":
        kind = "mask-rcnn" if model["detector"] == "mask_rcnn" else "retinanet"
        name = f"{kind}-{model['name']}-1x"
    else:
        name = f"semantic-fpn-{model['name']}-40k"
    recipe = load_preset(task, name) if name in list_presets(task) else {}
    recipe.setdefault("model", {}).update(model)
    return recipe


def recipe_of(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recipe a converted file carries (see ``convert_whole_model``), or None."""
    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return None
    _, meta = _keys(path)
    text = meta.get(RECIPE_KEY)
    return json.loads(text) if text else None


def convert_whole_model(src: str, dst: str, *, allow_nonfinite: bool = False) -> str:
    """Convert a whole detector / segmenter file (mmdetection, mmsegmentation, the authors' or this
    project's) into this project's safetensors with its recipe; returns a report for people.

    The recipe: the papers' preset for a published file (mmdetection's or the authors' models are
    those recipes), a run's own ``config.yaml`` for a file that lies beside one, and none for a
    file of this project's without it (no recipe is better than one that does not fit).
    """
    from pvt.checkpoint.io import FORMAT_NAME, read_checkpoint
    from pvt.engine.config import read_yaml

    task = whole_model_task(src)
    if task == "detection":
        from pvt.tasks.detection.convert import convert_detector

        det = convert_detector(src, dst, allow_nonfinite=allow_nonfinite)
        model = {"name": det.backbone, "detector": det.detector, "num_classes": det.num_classes}
        model["semantics"] = det.semantics
        own, report = det.source_format == FORMAT_NAME, str(det.report)
    elif task == "segmentation":
        from pvt.tasks.segmentation.convert import convert_segmenter

        seg, load_report = convert_segmenter(src, dst, allow_nonfinite=allow_nonfinite)
        model = {"name": seg.backbone, "num_classes": seg.num_classes}
        own, report = seg.backbone_layout == FORMAT_NAME, str(load_report or f"{src}: {len(seg.state_dict)} tensors")
    else:
        raise CheckpointError(f"{src}: not a whole detector or segmenter")
    run_config = Path(src).parent / "config.yaml"
    recipe = (read_yaml(run_config) if run_config.is_file() else None) if own else paper_recipe(task, model)
    # Re-write the header with the recipe; the tensors are the ones just written and load-checked.
    sd, meta = read_checkpoint(dst)
    meta = {**meta, "task": task}
    if recipe is not None:
        meta[RECIPE_KEY] = json.dumps(recipe)
    save_safetensors(sd, dst, metadata=meta)
    carried = (
        "with its recipe" if recipe is not None else f"no recipe: pass --preset when using it ({run_config} not found)"
    )
    return f"{report}\nwrote {dst} ({task}: {model['name']}, {model['num_classes']} classes, {carried})"


def published_source(task: str, backbone: str, tag: bool | str, detector: str | None = None) -> Any:
    """The ``pvt weights`` row of a published detector / segmenter (``pvt.hub.WeightsSource``).

    ``tag`` True (or the task's name, ``coco`` / ``ade20k``) picks the default file (for
    ``detector`` when given); any other tag names a file (of ``detector`` when given).
    """
    from pvt.hub import get_source

    hub_task = HUB_TASK[task]
    arch = "semantic_fpn" if task == "segmentation" else detector
    default = tag is True or tag == hub_task
    return get_source(backbone, None if default else str(tag), task=hub_task, arch=arch)


def published_recipe(task: str, backbone: str, tag: bool | str, overrides: list[str]) -> dict[str, Any]:
    """The papers' recipe for a published whole model (``pvt predict detection --pretrained coco``)."""
    detector = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.detector=")), None)
    source = published_source(task, backbone, tag, detector)
    model: dict[str, Any] = {"name": backbone, "num_classes": source.num_classes}
    if task == "detection":
        model["detector"] = source.arch
    return paper_recipe(task, model)
