"""How RetinaNet and Mask R-CNN are exported (``DetectionTask.export_spec``).

torchvision's detectors take a list of images and keep a data-dependent number of boxes at every
step of their post-processing (score threshold, ``topk(min(k, n))``, NMS), on which
``torch.export`` cannot guard: they go through the TorchScript exporter, one image per run.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pvt.engine.config import Recipe
from pvt.engine.task import ExportSpec

NO_PT2 = (
    "torch.export cannot trace torchvision's RetinaNet / Mask R-CNN post-processing, whose number of boxes after "
    "the score threshold, top-k and NMS depends on the data and on which torchvision's code branches (a "
    "data-dependent guard); export it with --format onnx (TorchScript exporter) instead"
)
NO_MMDET = (
    "a detector with semantics='mmdet' cannot be exported faithfully: its preprocessing decides per image whether "
    "the pixels hold 8-bit values and then resizes with OpenCV's fixed-point arithmetic "
    "(pvt.detection.mmdet_compat), a data-dependent choice a traced graph would freeze to the example's; build it "
    "with semantics='torchvision' (--set model.semantics=torchvision) to export it"
)


class DetectorOnImage(nn.Module):
    """A torchvision detector as a function of one ``[3, H, W]`` image returning a tuple of tensors
    (exporters take tensors, not the list of images and list of dicts torchvision uses)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.detector([image])[0]
        return tuple(out[k] for k in ("boxes", "scores", "labels", "masks") if k in out)


def export_spec(model: Any, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
    from pvt.detection.coco import COCO_CLASSES

    two_stage = hasattr(model, "roi_heads")  # Mask R-CNN
    masks = two_stage and getattr(model.roi_heads, "mask_head", None) is not None
    names = ("boxes", "scores", "labels") + (("masks",) if masks else ())
    outputs = {
        "boxes": "[N, 4] float32 x1, y1, x2, y2 in input-image pixels",
        "scores": "[N] float32, descending",
        "labels": "[N] int64 class index (into classes / class_names, from 0)",
    }
    if masks:
        outputs["masks"] = "[N, 1, H, W] float32 mask probabilities at the input's size (threshold 0.5)"
    t: Any = model.transform
    metadata = {
        "input": {
            "name": "image",
            "layout": "CHW (one image per run)",
            "dtype": "float32",
            "range": "RGB in 0..1, any size; the model resizes, normalises and pads it itself",
        },
        "outputs": outputs,
        "label_offset": 0,  # files from before 0.1.0's label convention said 1 for Mask R-CNN
        "preprocess": {
            "inside_model": True,
            "resize": f"keep the aspect ratio, short side {list(t.min_size)[-1]}, long side at most {t.max_size}",
            "mean": list(t.image_mean),
            "std": list(t.image_std),
            "pad_to_multiple_of": t.size_divisible,
            "order": "RGB; scale 0..255 to 0..1 before feeding",
        },
    }
    if two_stage:  # the box predictor counts the background too
        fields = {"detector": "mask_rcnn", "num_classes": model.roi_heads.box_predictor.cls_score.out_features - 1}
    else:
        fields = {"detector": "retinanet", "num_classes": model.head.classification_head.num_classes}
    classes = artifacts.get("classes") or getattr(model, "class_names", None)
    if not classes and recipe is not None and recipe.model.num_classes == 80 and recipe.data.dataset == "coco":
        classes = COCO_CLASSES
    m: Any = recipe.model if recipe is not None else None  # the detection section (min_size, ...)
    side = int(m.min_size[-1]) if m is not None else 800  # the size it resizes to (square)
    size_axes = {"image": {1: "height", 2: "width"}}
    if masks:
        size_axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    return ExportSpec(
        kind="detection",
        module=DetectorOnImage(model),
        outputs=names,
        one_image=True,
        torchscript=True,
        default_size=(side, side),
        metadata=metadata,
        recipe={"model": fields, "data": {"dataset": recipe.data.dataset} if recipe is not None else {}},
        classes=list(classes) if classes else None,
        refuse=NO_MMDET if getattr(model, "semantics", "torchvision") == "mmdet" else None,
        no_pt2=NO_PT2,
        varying_axes={n: {0: "detections"} for n in names},
        size_axes=size_axes,
        dynamic_info={
            "detections": True,
            "note": "one image [3, H, W] per run; the number of detections always varies",
        },
    )
