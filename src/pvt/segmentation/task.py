"""Semantic segmentation on the engine: Semantic FPN, ADE20K / folder / shapes data, mIoU."""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pvt.engine.config import ModelConfig, Recipe
from pvt.engine.distributed import DistInfo, all_reduce_sum
from pvt.engine.task import ExportSpec, Predictor, Task, WholeModel
from pvt.segmentation.data import (
    SegmentationData,
    SegmentationFolder,
    TrainTransform,
    class_names,
    collate,
    eval_size,
    split_folders,
)
from pvt.segmentation.inference import infer, infer_batch
from pvt.segmentation.metrics import confusion_matrix, per_class_table, segmentation_metrics
from pvt.segmentation.models import HUB_TASK, semantic_fpn
from pvt.utils.files import save_png

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class SegmentationModel(ModelConfig):
    """The ``model`` section of a segmentation recipe. ``name`` is the backbone; ``checkpoint`` is a
    whole model's weights (a run's ``model.safetensors``), ``backbone_checkpoint`` a backbone's."""

    name: str = "pvt_small"
    num_classes: int = 150
    backbone_checkpoint: str | None = None
    backbone_pretrained: bool | str = False  # the backbone's published ImageNet weights: true or a tag
    fpn_channels: int = 256
    head_channels: int = 128
    dropout: float = 0.1
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP (mmseg's SyncBN)
    class_weight: list[float] | None = None  # per-class cross-entropy weights (mmseg loss_decode.class_weight)


def build_segmenter(m: SegmentationModel) -> nn.Module:
    return semantic_fpn(
        m.name,
        m.num_classes,
        checkpoint=m.checkpoint,
        pretrained=False if m.checkpoint else m.pretrained,  # --pretrained [TAG]: the published model
        allow_nonfinite=m.allow_nonfinite,
        backbone_checkpoint=m.backbone_checkpoint,
        backbone_pretrained=m.backbone_pretrained,
        drop_path_rate=m.drop_path_rate,
        freeze_stages=m.freeze_stages,
        fpn_channels=m.fpn_channels,
        head_channels=m.head_channels,
        dropout=m.dropout,
    )


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours: distinct, fixed (the same class, the same colour)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, size=(max(num_classes, 1), 3), dtype=np.uint8)
    base = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], np.uint8)  # fmt: skip
    colours[: min(len(base), num_classes)] = base[:num_classes]
    return colours


def label_png(label: np.ndarray, colours: np.ndarray) -> Any:
    """A palette PNG whose pixel values are the class indices (colours only for viewing)."""
    from PIL import Image

    im = Image.fromarray(label.astype(np.uint8 if label.max(initial=0) < 256 else np.int32))
    if im.mode == "L":
        im = im.convert("P")
        flat = np.zeros((256, 3), np.uint8)
        flat[: len(colours)] = colours[:256]
        im.putpalette(flat.reshape(-1).tolist())
    return im


def overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image [H, W, 3]`` uint8 blended with the class colours of ``label [H, W]``."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours[label].astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def check_settings(d: SegmentationData) -> None:
    """Bad data values fail before any training, naming the key."""
    for key in ("scale", "ratio_range", "crop_size", "eval_scale", "slide_stride"):
        value = getattr(d, key)
        if len(value) != 2 or min(value) <= 0:
            raise ValueError(f"data.{key}={value}: expected two positive numbers")
    if d.eval_mode not in ("whole", "slide"):
        raise ValueError(f"data.eval_mode={d.eval_mode!r}: expected 'whole' or 'slide'")
    if not d.eval_ratios or min(d.eval_ratios) <= 0:
        raise ValueError(f"data.eval_ratios={d.eval_ratios}: expected positive scale ratios, e.g. [1.0]")


class SegmentationTask(Task):
    name = "segmentation"
    data_config = SegmentationData
    model_config = SegmentationModel
    headline = ("mIoU", "mAcc", "aAcc")
    hub_task = HUB_TASK

    def claims_checkpoint(self, keys: Sequence[str], meta: Mapping[str, str]) -> bool:
        if meta.get("task") == self.name:
            return True
        return any(k.startswith("decode_head.") for k in keys) or "head.classifier.weight" in keys

    def read_whole_model(self, src: str, *, allow_nonfinite: bool = False) -> WholeModel:
        from pvt.checkpoint.io import FORMAT_NAME
        from pvt.segmentation.models import converted_segmenter

        seg, model, header = converted_segmenter(src, allow_nonfinite=allow_nonfinite)
        report = str(getattr(model, "load_report", None) or f"{src}: {len(seg.state_dict)} tensors")
        fields = {"name": seg.backbone, "num_classes": seg.num_classes}
        own = seg.backbone_layout == FORMAT_NAME
        return WholeModel(model.state_dict(), header, fields, own, report)

    def paper_preset(self, model: Mapping[str, Any]) -> str:
        return f"semantic-fpn-{model['name']}-40k"

    def published_arch(self, model: Mapping[str, Any]) -> str | None:
        return "semantic_fpn"

    def owns_model(self, model: nn.Module) -> bool:
        from pvt.segmentation.models import SemanticFPN

        return isinstance(model, SemanticFPN)

    def export_spec(self, model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
        from pvt.segmentation.export import export_spec

        return export_spec(model, recipe, artifacts)

    def build_model(self, recipe: Recipe) -> nn.Module:
        m = recipe.model
        assert isinstance(m, SegmentationModel)
        if m.class_weight is not None and len(m.class_weight) != m.num_classes:
            raise ValueError(f"model.class_weight has {len(m.class_weight)} values for {m.num_classes} classes")
        self._weight = torch.tensor(m.class_weight) if m.class_weight else None
        model = build_segmenter(m)  # a whole model's checkpoint (any layout) is loaded by the builder
        if getattr(model, "load_report", None) is not None:
            print(model.load_report, file=sys.stderr)
        if m.sync_bn and torch.distributed.is_initialized() and torch.cuda.is_available():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _reduce_zero(self, d: SegmentationData) -> bool:
        return d.dataset == "ade20k" if d.reduce_zero_label is None else d.reduce_zero_label

    def build_datasets(self, recipe: Recipe, *, train: bool = True) -> tuple[Dataset[Any] | None, Dataset[Any]]:
        d: SegmentationData = recipe.data
        n = recipe.model.num_classes
        self._data, self._classes = d, class_names(d, n)
        check_settings(d)
        kw = dict(num_classes=n, ignore_index=d.ignore_index, reduce_zero_label=self._reduce_zero(d))
        train_ds = None
        if train:
            transform = TrainTransform(
                scale=(d.scale[0], d.scale[1]),
                ratio_range=(d.ratio_range[0], d.ratio_range[1]),
                crop_size=(d.crop_size[0], d.crop_size[1]),
                cat_max_ratio=d.cat_max_ratio,
                hflip=d.hflip,
                photometric=d.photometric,
                ignore_index=d.ignore_index,
            )
            train_ds = SegmentationFolder(*split_folders(d, "train"), transform=transform, **kw)  # type: ignore[arg-type]
        val_ds = SegmentationFolder(*split_folders(d, "val"), **kw)  # type: ignore[arg-type]
        return train_ds, val_ds

    def collate(self, batch: list[Any]) -> Any:
        return collate(batch)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        images, labels, _ = batch
        logits = model(images.to(device, non_blocking=True))  # [B, C, H, W] at the crop size
        weight = self._weight.to(device) if self._weight is not None else None
        target = labels.to(device, non_blocking=True)
        return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=self._data.ignore_index)

    def infer_kwargs(self, d: SegmentationData) -> dict[str, Any]:
        return dict(
            scale=(d.eval_scale[0], d.eval_scale[1]),
            align=d.align,
            mode=d.eval_mode,
            crop=(d.crop_size[0], d.crop_size[1]),
            stride=(d.slide_stride[0], d.slide_stride[1]),
            flip=d.eval_flip,
            ratios=tuple(d.eval_ratios),
        )

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        device: torch.device,
        dist: DistInfo,
        autocast: Callable[[], Any],
    ) -> dict[str, float]:
        n = len(self._classes)
        cm = torch.zeros(n, n, dtype=torch.int64, device=device)
        kw = self.infer_kwargs(self._data)
        for images, labels, _ in batches:
            for image, label in zip(images, labels, strict=True):
                with autocast():
                    pred = infer(model, image.to(device), **kw).argmax(0)
                cm += confusion_matrix(pred, label.to(device), n, self._data.ignore_index)
        cm = all_reduce_sum(cm, dist)
        metrics = segmentation_metrics(cm.cpu(), self._classes)
        if dist.is_main:
            print(per_class_table(metrics), file=sys.stderr)
        return metrics

    def artifacts(self) -> dict[str, Any]:
        return {"classes": getattr(self, "_classes", [])}

    def predictor(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> SegmentationPredictor:
        return SegmentationPredictor(model, recipe, artifacts, self.infer_kwargs(recipe.data))


class SegmentationPredictor(Predictor):
    """The test-time inference of the recipe (same-size images share a forward); pixel shares."""

    def __init__(
        self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any], infer_kwargs: dict[str, Any]
    ) -> None:
        self.model = model.eval()
        n = recipe.model.num_classes
        names = artifacts.get("classes") or getattr(model, "class_names", None) or class_names(recipe.data, n)
        self.classes = list(names)
        self.colours = palette(n)
        self.infer_kwargs = infer_kwargs

    def prepare(self, image: Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)

    def forward(self, inputs: list[torch.Tensor]) -> list[np.ndarray]:
        with torch.inference_mode():
            return [p.argmax(0).numpy() for p in infer_batch(self.model, inputs, **self.infer_kwargs)]

    def record(self, name: str, output: np.ndarray, index: int = 0) -> dict[str, Any]:
        ids, counts = np.unique(output, return_counts=True)
        shares = zip(ids.tolist(), counts.tolist(), strict=True)
        return {"image": name, "classes": {self.classes[i]: round(c / output.size, 4) for i, c in shares}}

    def group_key(self, x: torch.Tensor) -> Hashable:
        """The test-time size (``eval_size``): images resized alike share a forward."""
        k = self.infer_kwargs
        return eval_size(int(x.shape[-2]), int(x.shape[-1]), k["scale"], 1.0, k["align"])

    def write_files(self, out: Path, stem: str, x: torch.Tensor, output: np.ndarray, pictures: bool) -> dict[str, str]:
        """``STEM_label.png`` (class indices, with a palette); with ``pictures`` the colour overlay."""
        from PIL import Image as PILImage

        files = {"label_png": str(out / f"{stem}_label.png")}
        save_png(label_png(output, self.colours), files["label_png"])
        if pictures:
            files["overlay_png"] = str(out / f"{stem}_overlay.png")
            rgb = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            save_png(PILImage.fromarray(overlay(rgb, output, self.colours)), files["overlay_png"])
        return files

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        d = recipe.data
        return {
            "architecture": f"semantic_fpn / {recipe.model.name}",
            "input_size": {"scale": list(d.eval_scale), "mode": d.eval_mode},
            "palette": self.colours.tolist(),  # the overlay's colour of each class
        }

    def extras(self, image: torch.Tensor, output: np.ndarray) -> dict[str, Any]:
        """The two PNGs of ``pvt predict segmentation --out``, as ``data:`` URLs."""
        from PIL import Image as PILImage

        rgb = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # exactly the uploaded 8-bit pixels
        return {
            "label_png": png_data_url(label_png(output, self.colours)),
            "overlay_png": png_data_url(PILImage.fromarray(overlay(rgb, output, self.colours))),
        }


def png_data_url(picture: Any) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL (for JSON answers a page draws)."""
    import base64
    import io

    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = [
    "SegmentationModel",
    "SegmentationPredictor",
    "SegmentationTask",
    "build_segmenter",
    "label_png",
    "overlay",
    "palette",
]
