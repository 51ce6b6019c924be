"""What an exported file says about itself: input name, layout and range, outputs, class names, the
preprocessing, and the recipe settings ``pvt predict`` / ``pvt eval`` rebuild the same pipeline from.

Stored as JSON values under ``pvt.<key>`` ONNX metadata_props (``onnxruntime``'s
``session.get_modelmeta().custom_metadata_map``) or in ``pvt_metadata.json`` of a ``.pt2`` archive.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pvt import __version__

# The settings of a recipe's data section that decide how images reach the model, per task:
# the exported file carries them so that predictions from it need no recipe.
PREPROCESS_FIELDS = {
    "classification": ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"),
    "segmentation": ("eval_scale", "align", "eval_mode", "crop_size", "slide_stride", "eval_flip", "eval_ratios"),
    "detection": ("dataset",),
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def describe(
    model: nn.Module,
    kind: str,
    *,
    size: tuple[int, int],
    recipe: Any = None,
    artifacts: dict[str, Any] | None = None,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """The metadata of ``model`` (``kind`` from ``pvt.deploy.export.model_kind``) exported at
    ``size``. ``recipe``: the ``pvt.engine`` recipe it was built from (its evaluation transform
    and test-time settings), else the model's published transform or the papers' defaults.
    ``artifacts``: a run's ``task.json``; ``classes``: the class names to state."""
    arch = getattr(model, "arch", None) or type(model).__name__
    meta: dict[str, Any] = {
        "format": "pvt-vision export 1",
        "producer": f"pvt-vision {__version__}",
        "task": kind,
        "arch": arch,
        "size": list(size),
        "classes": classes if classes is not None else _default_classes(model, kind),
        "artifacts": artifacts or {},
        "class_names": _plain(getattr(model, "class_names", None)),
    }
    section = _data_section(model, kind, recipe)
    if kind in ("classification", "features"):
        meta.update(_classification(model, kind, section))
    elif kind == "detection":
        meta.update(_detection(model))
    else:
        meta.update(_segmentation(section))
    if kind != "features":  # what pvt predict / eval --runtime onnxruntime set in their recipe
        fields = PREPROCESS_FIELDS[kind] if section is not None else ()
        meta["recipe"] = {
            "model": _model_fields(model, kind),
            "data": {k: _plain(getattr(section, k)) for k in fields},
        }
    return meta


def _data_section(model: nn.Module, kind: str, recipe: Any) -> Any:
    """The data settings the model's inputs follow: the recipe's evaluation transform (for a
    classifier, that of its published weights), else the published transform or the defaults."""
    from pvt.tasks.classification.data import ClassificationData
    from pvt.tasks.segmentation.data import SegmentationData

    if kind in ("classification", "features"):
        if recipe is not None and kind == "classification":
            from pvt.tasks.classification.task import eval_data

            return eval_data(recipe)
        source = getattr(model, "pretrained_source", None)
        return getattr(source, "eval_transform", None) or ClassificationData()
    if kind == "segmentation":
        return recipe.data if recipe is not None else SegmentationData()
    return recipe.data if recipe is not None else None


def _model_fields(model: Any, kind: str) -> dict[str, Any]:
    if kind == "detection":
        if hasattr(model, "roi_heads"):  # Mask R-CNN: the box predictor counts the background too
            return {"detector": "mask_rcnn", "num_classes": model.roi_heads.box_predictor.cls_score.out_features - 1}
        return {"detector": "retinanet", "num_classes": model.head.classification_head.num_classes}
    return {"num_classes": int(model.num_classes)}


def _default_classes(model: nn.Module, kind: str) -> list[str] | None:
    names = getattr(model, "class_names", None)
    if names:
        return list(names)
    pretrained = getattr(model, "pretrained_source", None) is not None
    if kind == "classification" and pretrained and getattr(model, "num_classes", 0) == 1000:
        from pvt.hub import imagenet_classes

        return list(imagenet_classes())
    return None


def _classification(model: nn.Module, kind: str, data: Any) -> dict[str, Any]:
    mean, std = list(data.mean), list(data.std)
    pre: dict[str, Any] = {"mean": mean, "std": std, "order": "RGB, scale to 0..1, then (x - mean) / std"}
    if kind == "classification":
        resize = round(data.input_size / data.crop_pct) if data.crop_mode == "center" else data.input_size
        pre.update(
            resize_short_side=resize,
            center_crop=data.input_size,
            crop_mode=data.crop_mode,
            crop_pct=data.crop_pct,
            interpolation=data.interpolation,
        )
        outputs = {"logits": "[B, num_classes] raw scores (softmax for probabilities)"}
    else:
        outputs = {
            f"features_s{r}": f"[B, C, H/{r}, W/{r}] feature map at stride {r}"
            for r in model.feature_info.reduction()  # type: ignore[union-attr, operator]
        }
    return {
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "range": "normalised: RGB in 0..1, then (x - mean) / std per channel",
            "mean": mean,
            "std": std,
        },
        "outputs": outputs,
        "preprocess": pre,
    }


def _detection(model: nn.Module) -> dict[str, Any]:
    t: Any = model.transform
    masks = "masks" if hasattr(model, "roi_heads") and getattr(model.roi_heads, "mask_head", None) else None
    offset = 1 if hasattr(model, "roi_heads") else 0
    outputs = {
        "boxes": "[N, 4] float32 x1, y1, x2, y2 in input-image pixels",
        "scores": "[N] float32, descending",
        "labels": f"[N] int64 class index{' (0 is background, so class i is label i + 1)' if offset else ''}",
    }
    if masks:
        outputs["masks"] = "[N, 1, H, W] float32 mask probabilities at the input's size (threshold 0.5)"
    return {
        "input": {
            "name": "image",
            "layout": "CHW (one image per run)",
            "dtype": "float32",
            "range": "RGB in 0..1, any size; the model resizes, normalises and pads it itself",
        },
        "outputs": outputs,
        "label_offset": offset,
        "preprocess": {
            "inside_model": True,
            "resize": f"keep the aspect ratio, short side {list(t.min_size)[-1]}, long side at most {t.max_size}",
            "mean": list(t.image_mean),
            "std": list(t.image_std),
            "pad_to_multiple_of": t.size_divisible,
            "order": "RGB; scale 0..255 to 0..1 before feeding",
        },
    }


def _segmentation(d: Any) -> dict[str, Any]:
    from pvt.tasks.detection.models import IMAGE_MEAN, IMAGE_STD

    return {
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "range": "RGB in 0..1 (ImageNet mean / std normalisation is inside the model)",
        },
        "outputs": {"logits": "[B, num_classes, H, W] class scores at the input's size (argmax: label map)"},
        "preprocess": {
            "inside_model": {"mean": IMAGE_MEAN, "std": IMAGE_STD},
            "resize": (
                f"keep the aspect ratio into {list(d.eval_scale)} (long, short side limits), then each side to a "
                f"multiple of {d.align} (mmseg 0.13 AlignResize; bilinear); resize the logits back to the image"
            ),
            "eval_scale": list(d.eval_scale),
            "align": d.align,
        },
    }


def recipe_overrides(meta: dict[str, Any]) -> list[str]:
    """``--set`` overrides that give a recipe the exported model's classes and preprocessing."""
    import json

    recipe = meta.get("recipe") or {}
    out = []
    for section in ("model", "data"):
        for key, value in (recipe.get(section) or {}).items():
            out.append(f"{section}.{key}={json.dumps(value)}")
    return out


__all__ = ["describe", "recipe_overrides"]
