"""How classifiers and four-map backbones are exported (``ClassificationTask.export_spec``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pvt.classification.data import ClassificationData, eval_data, imagenet_source
from pvt.engine.config import Recipe
from pvt.engine.task import ExportSpec
from pvt.models import PyramidBackbone

# The recipe's data settings that decide how images reach a classifier: the exported file carries
# them, so that predictions from it need no recipe.
PREPROCESS_FIELDS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def export_spec(model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
    """A classifier (logits) or, for a features-only PVT, a backbone (one output per stride)."""
    assert isinstance(model, PyramidBackbone)
    features = bool(model.features_only)
    kind = "features" if features else "classification"
    if recipe is not None and not features:
        data = eval_data(recipe)  # the transform of its published weights, where it has them
    else:
        source = getattr(model, "pretrained_source", None)
        data = getattr(source, "eval_transform", None) or ClassificationData()
    mean, std = list(data.mean), list(data.std)
    pre: dict[str, Any] = {"mean": mean, "std": std, "order": "RGB, scale to 0..1, then (x - mean) / std"}
    if features:
        outputs = {
            f"features_s{r}": f"[B, C, H/{r}, W/{r}] feature map at stride {r}"
            for r in model.feature_info.reduction()  # type: ignore[union-attr, operator]
        }
    else:
        resize = round(data.input_size / data.crop_pct) if data.crop_mode == "center" else data.input_size
        pre.update(
            resize_short_side=resize,
            center_crop=data.input_size,
            crop_mode=data.crop_mode,
            crop_pct=data.crop_pct,
            interpolation=data.interpolation,
        )
        outputs = {"logits": "[B, num_classes] raw scores (softmax for probabilities)"}
    metadata = {
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
    side = int(recipe.data.input_size) if recipe is not None and not features else 224
    fields = {
        "model": {"num_classes": int(model.num_classes)},
        "data": {k: _plain(getattr(data, k)) for k in PREPROCESS_FIELDS},
    }
    return ExportSpec(
        kind=kind,
        module=model,
        outputs=tuple(outputs),
        default_size=(side, side),
        metadata=metadata,
        recipe={} if features else fields,
        classes=None if features else _classes(model, recipe, artifacts),
    )


def _classes(model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> list[str] | None:
    """The class names ``pvt predict`` would print: the run's, the model's, or ImageNet's for a
    model that keeps its published 1000-class head."""
    names = artifacts.get("classes") or getattr(model, "class_names", None)
    if names:
        return list(names)
    published = imagenet_source(recipe) is not None if recipe is not None else False
    from_hub = getattr(model, "pretrained_source", None) is not None and getattr(model, "num_classes", 0) == 1000
    published = published or from_hub
    if published:
        from pvt.hub import imagenet_classes

        return list(imagenet_classes())
    return None
