"""COCO-format detection data: checked annotations, contiguous labels, masks, transforms v2."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from pvt.engine.task import LoaderConfig


class AnnotationError(ValueError):
    """A malformed annotation; the message names the file, the image and the annotation id."""


@dataclass
class DetectionData(LoaderConfig):
    """The ``data`` section of a detection recipe."""

    root: str | None = None  # COCO layout: annotations/instances_{split}2017.json, {split}2017/
    dataset: str = "coco"  # coco | shapes (embedded synthetic scenes, generated on first use)
    train_split: str = "train"
    val_split: str = "val"
    train_ann: str | None = None  # explicit paths override the COCO layout
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    hflip: float = 0.5
    # The 3x recipe's DETR-style policy, drawn with this probability per image (mmdet AutoAugment: 0.5):
    # short side resized to one of crop_resize (long side <= 1333), then a random crop with sides
    # in crop_size; the detector then resizes to model.min_size as usual.
    crop: float = 0.0
    crop_resize: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    drop_invalid: bool = False  # drop malformed annotations with a counted warning instead of failing
    shapes: dict[str, int] = field(default_factory=dict)  # ShapesSpec overrides for dataset=shapes


def coco_paths(cfg: DetectionData, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of ``train`` or ``val`` from the layout or explicit paths."""
    ann = cfg.train_ann if split == "train" else cfg.val_ann
    img = cfg.train_images if split == "train" else cfg.val_images
    name = cfg.train_split if split == "train" else cfg.val_split
    if ann and img:
        return Path(ann), Path(img)
    root = dataset_root(cfg)
    return (Path(ann) if ann else root / "annotations" / f"instances_{name}2017.json"), (
        Path(img) if img else root / f"{name}2017"
    )


def dataset_root(cfg: DetectionData) -> Path:
    if cfg.dataset == "shapes":
        from pvt.datasets.shapes import ShapesSpec, export_shapes

        return Path(cfg.root) if cfg.root else export_shapes(ShapesSpec(**cfg.shapes))
    if cfg.dataset != "coco":
        raise AnnotationError(f"data.dataset={cfg.dataset!r}: expected 'coco' or 'shapes'")
    if not cfg.root:
        raise AnnotationError("data.root is not set: pass --data ROOT (COCO layout) or set data.train_ann etc.")
    return Path(cfg.root)


class CocoDetection(Dataset[tuple[Any, dict[str, Any]]]):
    """One COCO split -> ``(image [3, H, W] float in 0..1, target)`` with ``boxes`` (XYXY, pixels),
    ``labels`` (contiguous, starting at ``label_offset``), ``image_id`` and, with ``masks``,
    ``masks`` ``[N, H, W]`` uint8. Crowd regions are left out of the targets (COCO evaluation
    handles them from the json)."""

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        *,
        train: bool,
        masks: bool = False,
        label_offset: int = 0,
        hflip: float = 0.5,
        crop: float = 0.0,
        crop_resize: tuple[int, ...] = (400, 500, 600),
        crop_size: tuple[int, int] = (384, 600),
        drop_invalid: bool = False,
    ) -> None:
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        if not self.ann_file.is_file():
            raise AnnotationError(f"{self.ann_file}: annotation file not found")
        if not self.image_dir.is_dir():
            raise AnnotationError(f"{self.image_dir}: image folder not found")
        try:
            coco = json.loads(self.ann_file.read_text())
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{self.ann_file}: not valid JSON ({e})") from e
        for key in ("images", "annotations", "categories"):
            if key not in coco:
                raise AnnotationError(f"{self.ann_file}: no '{key}' list; expected COCO instances format")
        self.categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in self.categories]
        self.class_names = [c["name"] for c in self.categories]
        self.cat_to_label = {cid: i + label_offset for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.images = {im["id"]: im for im in coco["images"]}
        self.ids = sorted(self.images)
        self.masks, self.train = masks, train
        self.dropped = 0
        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in self.ids}
        for ann in coco["annotations"]:
            problem = self._check(ann)
            if problem is None:
                per_image[ann["image_id"]].append(ann)
                continue
            if not drop_invalid:
                raise AnnotationError(f"{problem}; fix the annotation or set data.drop_invalid=true to drop it")
            self.dropped += 1
        if self.dropped:
            warnings.warn(f"{self.ann_file}: dropped {self.dropped} malformed annotation(s)", stacklevel=2)
        self.anns = per_image
        self.transform = train_transform(hflip, crop, crop_resize, crop_size) if train else v2.Identity()

    def _check(self, ann: dict[str, Any]) -> str | None:
        where = f"{self.ann_file}: annotation id {ann.get('id')}"
        image = self.images.get(ann.get("image_id"))  # type: ignore[arg-type]
        if image is None:
            return f"{where} refers to unknown image id {ann.get('image_id')}"
        where += f" (image {image['file_name']})"
        if ann.get("category_id") not in self.cat_to_label:
            return f"{where} has unknown category id {ann.get('category_id')}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            return f"{where} has no [x, y, w, h] bbox"
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            return f"{where} has a box of zero or negative size {bbox}"
        W, H = image["width"], image["height"]
        if x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1:
            return f"{where} has box {bbox} outside the {W}x{H} image"
        seg = ann.get("segmentation")
        if self.masks and isinstance(seg, dict) and list(seg.get("size", [H, W])) != [H, W]:
            return f"{where} has a mask of size {seg.get('size')} for a {H}x{W} image"
        return None

    def __len__(self) -> int:
        return len(self.ids)

    def _mask(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        from pycocotools import mask as mask_utils

        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_utils.decode(rle)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except OSError as e:
            raise AnnotationError(f"{path}: cannot read this image ({e})") from e
        w, h = pil.size
        anns = [a for a in self.anns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clamp(min=0), format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        if self.masks:
            m = np.stack([self._mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(m))
        image = v2.functional.to_dtype(v2.functional.to_image(pil), torch.float32, scale=True)
        image, target = self.transform(image, target)
        target["boxes"] = v2.functional.clamp_bounding_boxes(target["boxes"]).as_subclass(torch.Tensor)
        if self.masks:
            target["masks"] = target["masks"].as_subclass(torch.Tensor)
        target["image_id"] = image_id
        return image.as_subclass(torch.Tensor), target


class RandomSizeCrop:
    """A crop with height and width drawn uniformly from ``[lo, min(side, hi)]`` at a uniform
    position (mmdet ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``)."""

    def __init__(self, lo: int, hi: int) -> None:
        if not 0 < lo <= hi:
            raise ValueError(f"crop size range ({lo}, {hi}): expected 0 < lo <= hi")
        self.lo, self.hi = lo, hi

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        H, W = image.shape[-2:]
        ch = int(torch.randint(min(self.lo, H), min(H, self.hi) + 1, ()).item())
        cw = int(torch.randint(min(self.lo, W), min(W, self.hi) + 1, ()).item())
        top = int(torch.randint(0, H - ch + 1, ()).item())
        left = int(torch.randint(0, W - cw + 1, ()).item())
        crop = v2.functional.crop
        tv = {k: (crop(v, top, left, ch, cw) if isinstance(v, tv_tensors.TVTensor) else v) for k, v in target.items()}
        return crop(image, top, left, ch, cw), tv


def train_transform(
    hflip: float, crop: float, crop_resize: tuple[int, ...], crop_size: tuple[int, int]
) -> Callable[..., Any]:
    """Flip, and with probability ``crop`` the DETR-style resize-then-crop policy; degenerate boxes
    (and their labels and masks) are removed after the crop, as mmdetection does."""
    steps: list[Callable[..., Any]] = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    if crop > 0:
        policy = v2.Compose([v2.RandomShortestSize(list(crop_resize), max_size=1333), RandomSizeCrop(*crop_size)])
        steps += [v2.RandomApply([policy], p=crop), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps) if steps else v2.Identity()


def collate(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
