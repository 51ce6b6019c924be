"""Detection and instance segmentation on the engine: RetinaNet / Mask R-CNN, COCO data and AP."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from pvt.detection.coco import COCO_CATEGORY_IDS, COCO_CLASSES
from pvt.detection.data import CocoDetection, DetectionData, coco_paths, collate
from pvt.detection.evaluate import STAT_NAMES, coco_evaluate, to_coco_results
from pvt.detection.mmdet_compat import MMDetTransform
from pvt.detection.models import HUB_TASK, mask_rcnn, retinanet
from pvt.engine.config import ModelConfig, Recipe
from pvt.engine.distributed import DistInfo, gather_objects
from pvt.engine.task import ExportSpec, Predictor, Task, WholeModel
from pvt.utils.files import atomic_write, save_png

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class DetectionModel(ModelConfig):
    """The ``model`` section of a detection recipe. ``name`` is the backbone; ``checkpoint`` is a
    whole detector's weights (a run's ``model.safetensors``, a ``convert_detector`` output or an
    mmdetection / authors' checkpoint), ``backbone_checkpoint`` a backbone's."""

    name: str = "pvt_small"
    num_classes: int = 80
    detector: str = "retinanet"  # retinanet | mask_rcnn
    backbone_checkpoint: str | None = None
    backbone_pretrained: bool | str = False  # the backbone's published ImageNet weights: true or a tag
    fpn_channels: int = 256
    anchor_base: float = 4.0  # RetinaNet: octave base scale (mmdet 4); Mask R-CNN: P2 anchor = 8 x this
    min_size: list[int] = field(default_factory=lambda: [800])  # several: multi-scale training
    max_size: int = 1333
    score_thresh: float = 0.05
    detections_per_img: int = 100
    head_norm: bool = False  # RetinaNet: GroupNorm in the head (not in the papers; helps from scratch)
    head_width: int | None = None  # Mask R-CNN: narrower RoI heads (None: 1024-d box MLP, 256-ch mask convs)
    roi_batch: int = 512  # Mask R-CNN: sampled RoIs per image for the box/mask heads (mmdet 512)
    rpn_proposals: int = 2000  # Mask R-CNN: proposals kept after NMS in training (mmdet 1000 per level)
    # Test-time arithmetic: "torchvision" or "mmdet" (mmdetection 3.3's anchors, box coding, NMS,
    # preprocessing and post-processing; see pvt.detection.mmdet_compat). None: the
    # checkpoint's (an mmdetection file says mmdet), else torchvision.
    semantics: str | None = None
    embed_norm_eps: float | None = None  # PVT patch-embed / SR LayerNorm eps; None: checkpoint's, else 1e-5


def build_detector(m: DetectionModel) -> nn.Module:
    """The recipe's detector: untrained, or the whole detector of ``model.checkpoint`` /
    ``model.pretrained`` (which must be this recipe's detector, backbone and class count, and
    brings its semantics and eps where the recipe leaves them unset)."""
    whole = m.checkpoint is not None or bool(m.pretrained)
    common: dict[str, Any] = dict(
        num_classes=m.num_classes,
        checkpoint=m.checkpoint,
        pretrained=False if m.checkpoint else m.pretrained,
        semantics=m.semantics,
        embed_norm_eps=m.embed_norm_eps,
        allow_nonfinite=m.allow_nonfinite,
        backbone_checkpoint=None if whole else m.backbone_checkpoint,
        backbone_pretrained=False if whole else m.backbone_pretrained,  # a whole detector replaces them
        drop_path_rate=m.drop_path_rate,
        freeze_stages=m.freeze_stages,
        fpn_channels=m.fpn_channels,
        min_size=tuple(m.min_size),
        max_size=m.max_size,
    )
    if m.detector == "retinanet":
        return retinanet(
            m.name,
            octave_base_scale=m.anchor_base,
            head_norm=m.head_norm,
            score_thresh=m.score_thresh,
            detections_per_img=m.detections_per_img,
            **common,
        )
    if m.detector == "mask_rcnn":
        sizes = tuple((8 * m.anchor_base * 2**i,) for i in range(5))
        return mask_rcnn(
            m.name,
            anchor_sizes=sizes,
            box_score_thresh=m.score_thresh,
            box_detections_per_img=m.detections_per_img,
            box_batch_size_per_image=m.roi_batch,
            head_width=m.head_width,
            rpn_pre_nms_top_n_train=m.rpn_proposals,
            rpn_post_nms_top_n_train=m.rpn_proposals,
            **common,
        )
    raise ValueError(f"model.detector={m.detector!r}: expected retinanet or mask_rcnn")


def per_class_table(metrics: dict[str, float], types: tuple[str, ...]) -> str:
    """Markdown table of per-class AP (percent), one column per IoU type."""
    classes = [k.split("/", 1)[1] for k in metrics if k.startswith(f"{types[0]}_ap/")]
    lines = ["| class | " + " | ".join(f"{t} AP" for t in types) + " |", "|---" * (len(types) + 1) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{metrics.get(f'{t}_ap/{c}', 0.0):.1f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


class DetectionTask(Task):
    name = "detection"
    data_config = DetectionData
    model_config = DetectionModel
    headline = ("bbox_ap", "bbox_ap50", "segm_ap")
    hub_task = HUB_TASK

    def claims_checkpoint(self, keys: Sequence[str], meta: Mapping[str, str]) -> bool:
        if meta.get("task") == self.name:
            return True
        heads = ("bbox_head.", "rpn_head.", "roi_head.", "head.classification_head.", "roi_heads.")
        return any(k.startswith(heads) for k in keys)

    def read_whole_model(self, src: str, *, allow_nonfinite: bool = False) -> WholeModel:
        from pvt.checkpoint.io import FORMAT_NAME
        from pvt.checkpoint.loader import check_finite
        from pvt.detection.convert import read_detector_checkpoint

        det = read_detector_checkpoint(src)
        if not allow_nonfinite:
            check_finite(det.state_dict, src)
        model = {"name": det.backbone, "detector": det.detector, "num_classes": det.num_classes}
        model["semantics"] = det.semantics
        own = det.source_format == FORMAT_NAME
        return WholeModel(det.state_dict, det.metadata(), model, own, str(det.report))

    def paper_preset(self, model: Mapping[str, Any]) -> str:
        kind = "mask-rcnn" if model["detector"] == "mask_rcnn" else "retinanet"
        return f"{kind}-{model['name']}-1x"

    def published_arch(self, model: Mapping[str, Any]) -> str | None:
        return model.get("detector")

    def published_model_fields(self, source: Any) -> dict[str, Any]:
        return {"detector": source.arch}

    def owns_model(self, model: nn.Module) -> bool:
        from torchvision.models.detection import MaskRCNN, RetinaNet

        return isinstance(model, (RetinaNet, MaskRCNN))

    def export_spec(self, model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
        from pvt.detection.export import export_spec

        return export_spec(model, recipe, artifacts)

    def artifacts_from_export(self, meta: dict[str, Any]) -> dict[str, Any]:
        # names and category ids as the run stored them; the file's own label convention
        return {**(meta.get("artifacts") or {}), "output_label_offset": int(meta.get("label_offset", 0))}

    def build_model(self, recipe: Recipe) -> nn.Module:
        m = recipe.model
        assert isinstance(m, DetectionModel)
        self._masks = m.detector == "mask_rcnn"
        self._offset = 1 if self._masks else 0  # Mask R-CNN's label 0 is background
        return build_detector(m)

    def build_datasets(self, recipe: Recipe, *, train: bool = True) -> tuple[Dataset[Any] | None, Dataset[Any]]:
        d: DetectionData = recipe.data
        masks = getattr(recipe.model, "detector", "") == "mask_rcnn"
        offset = 1 if masks else 0
        self._masks, self._offset = masks, offset  # also for a model not built here (an exported file)
        kw = dict(
            masks=masks,
            label_offset=offset,
            hflip=d.hflip,
            crop=d.crop,
            crop_resize=tuple(d.crop_resize),
            crop_size=tuple(d.crop_size),
            drop_invalid=d.drop_invalid,
        )
        train_ds = CocoDetection(*coco_paths(d, "train"), train=True, **kw) if train else None  # type: ignore[arg-type]
        val_ds = CocoDetection(*coco_paths(d, "val"), train=False, **kw)  # type: ignore[arg-type]
        n = len(val_ds.cat_ids)
        if n != recipe.model.num_classes:  # labels map to category ids one to one, both ways
            raise ValueError(
                f"{coco_paths(d, 'val')[0]}: {n} categories, but model.num_classes={recipe.model.num_classes}; "
                f"set --set model.num_classes={n}"
            )
        self._val = val_ds
        return train_ds, val_ds

    def group_ids(self, train_ds: Dataset[Any]) -> list[int] | None:
        """Aspect-ratio grouping (landscape / portrait), as mmdetection and torchvision do."""
        assert isinstance(train_ds, CocoDetection)
        return [int(im["width"] >= im["height"]) for im in (train_ds.images[i] for i in train_ds.ids)]

    def collate(self, batch: list[Any]) -> Any:
        return collate(batch)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(losses.values())  # type: ignore[return-value]

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        device: torch.device,
        dist: DistInfo,
        autocast: Callable[[], Any],
    ) -> dict[str, float]:
        results: list[dict[str, Any]] = []
        # The training labels of Mask R-CNN start at 1 (torchvision's background is 0); the
        # model's output labels index the classes from 0 for every detector.
        label_to_cat = {label - self._offset: cat for label, cat in self._val.label_to_cat.items()}
        for images, targets in batches:
            with autocast():
                outputs = model([im.to(device) for im in images])
            ids = [t["image_id"] for t in targets]
            results += to_coco_results(outputs, ids, label_to_cat, masks=self._masks)
        gathered = gather_objects(results, dist)
        if not dist.is_main:
            return {}
        merged = [r for part in gathered for r in part]  # type: ignore[attr-defined]
        types = ("bbox", "segm") if self._masks else ("bbox",)
        metrics, text = coco_evaluate(self._val.ann_file, merged, types)
        print(text + per_class_table(metrics, types), file=sys.stderr)
        return metrics

    def artifacts(self) -> dict[str, Any]:
        val = getattr(self, "_val", None)
        if val is None:
            return {}
        return {"classes": val.class_names, "category_ids": val.cat_ids}

    def write_derived(self, out: Path, records: Iterable[dict[str, Any]]) -> list[Path]:
        """``results.json``: every detection of the run in COCO's results format, written as it is read."""

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write("[")
                first = True
                for record in records:
                    for d in record["results"]:
                        f.write(("\n" if first else ",\n") + json.dumps(d))
                        first = False
                f.write("\n]\n")

        atomic_write(out / "results.json", write)
        return [out / "results.json"]

    def predictor(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> DetectionPredictor:
        return DetectionPredictor(model, recipe, artifacts)


class DetectionPredictor(Predictor):
    """Images of any size as one list (the detector resizes and pads them itself); COCO records."""

    def __init__(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> None:
        self.model = model.eval()
        classes = artifacts.get("classes") or getattr(model, "class_names", None) or []
        cat_ids = artifacts.get("category_ids") or list(range(1, recipe.model.num_classes + 1))
        from_run = "classes" in artifacts or "category_ids" in artifacts
        if not from_run and recipe.model.num_classes == 80 and recipe.data.dataset == "coco":
            # A published COCO detector (no training run beside it): COCO's own names and ids.
            classes, cat_ids = classes or list(COCO_CLASSES), list(COCO_CATEGORY_IDS)
        # Output labels index the classes from 0; a file exported before that says its offset.
        offset = int(artifacts.get("output_label_offset", 0))
        self.label_to_cat = {i + offset: c for i, c in enumerate(cat_ids)}
        self.names = {i + offset: (classes[i] if i < len(classes) else str(c)) for i, c in enumerate(cat_ids)}
        self.classes = list(self.names.values())
        self.category_ids = [int(c) for c in cat_ids]

    def prepare(self, image: Image) -> torch.Tensor:
        from torchvision.transforms import v2

        return v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)

    def forward(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            return list(self.model(inputs))

    def group_key(self, x: torch.Tensor) -> Hashable:
        """The size the detector resizes this image to: images that resize alike batch without
        padding, so their batch computes what each image alone would."""
        t: Any = getattr(self.model, "transform", None)
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if isinstance(t, MMDetTransform):
            return t.target_size(h, w)
        if isinstance(t, GeneralizedRCNNTransform):  # torchvision: interpolate(scale_factor=s), floored
            scale = min(float(t.min_size[-1]) / min(h, w), float(t.max_size) / max(h, w))
            return math.floor(h * scale), math.floor(w * scale)
        return tuple(x.shape)  # an exported file: same-size images only

    def write_files(self, out: Path, stem: str, x: torch.Tensor, output: Any, pictures: bool) -> dict[str, str]:
        """With ``pictures``: the detections scored 0.3 or more drawn over the image, ``STEM_pred.png``."""
        if not pictures:
            return {}
        from PIL import Image
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        keep = output["scores"] >= 0.3
        canvas = (x * 255).to(torch.uint8)
        if "masks" in output and keep.any():
            canvas = draw_segmentation_masks(canvas, output["masks"][keep, 0] > 0.5, alpha=0.4)
        labels = [f"{self.names.get(int(lbl), lbl)} {s:.2f}" for lbl, s in
                  zip(output["labels"][keep].tolist(), output["scores"][keep].tolist(), strict=True)]  # fmt: skip
        canvas = draw_bounding_boxes(canvas, output["boxes"][keep], labels=labels, colors="yellow", width=2)
        path = out / f"{stem}_pred.png"
        save_png(Image.fromarray(canvas.permute(1, 2, 0).numpy()), path)
        return {"picture": str(path)}

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        m: Any = recipe.model
        return {
            "architecture": f"{m.detector} / {m.name}",
            "category_ids": self.category_ids,  # what the records' category_id values name
            "input_size": {"min_size": list(m.min_size), "max_size": m.max_size},
        }

    def record(self, name: str, output: dict[str, torch.Tensor], index: int = 0) -> dict[str, Any]:
        dets = to_coco_results([output], [index + 1], self.label_to_cat, masks="masks" in output)
        for d in dets:
            d["file_name"] = name
        return {"image": name, "detections": len(dets), "results": dets}


__all__ = ["STAT_NAMES", "DetectionModel", "DetectionPredictor", "DetectionTask", "build_detector"]
