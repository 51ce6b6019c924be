"""How Semantic FPN models are exported (``SegmentationTask.export_spec``)."""

from __future__ import annotations

from typing import Any

from pvt.engine.config import Recipe
from pvt.engine.task import ExportSpec
from pvt.segmentation.data import SegmentationData, class_names
from pvt.utils.constants import IMAGENET_MEAN, IMAGENET_STD

# The recipe's test-time settings a segmenter's predictions follow (carried by the exported file).
PREPROCESS_FIELDS = ("eval_scale", "align", "eval_mode", "crop_size", "slide_stride", "eval_flip", "eval_ratios")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def export_spec(model: Any, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
    d = recipe.data if recipe is not None else SegmentationData()
    metadata = {
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "range": "RGB in 0..1 (ImageNet mean / std normalisation is inside the model)",
        },
        "outputs": {"logits": "[B, num_classes, H, W] class scores at the input's size (argmax: label map)"},
        "preprocess": {
            "inside_model": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "resize": (
                f"keep the aspect ratio into {list(d.eval_scale)} (long, short side limits), then each side to a "
                f"multiple of {d.align} (mmseg 0.13 AlignResize; bilinear); resize the logits back to the image"
            ),
            "eval_scale": list(d.eval_scale),
            "align": d.align,
        },
    }
    classes = artifacts.get("classes") or getattr(model, "class_names", None)
    if not classes and recipe is not None:
        classes = class_names(recipe.data, recipe.model.num_classes)
    return ExportSpec(
        kind="segmentation",
        module=model,
        default_size=(512, 512),
        metadata=metadata,
        recipe={
            "model": {"num_classes": int(model.num_classes)},
            "data": {k: _plain(getattr(d, k)) for k in PREPROCESS_FIELDS},
        },
        classes=list(classes) if classes else None,
    )
