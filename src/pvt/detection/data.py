"""COCO-format detection data: checked annotations, contiguous labels, masks, transforms v2."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
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
    shapes: dict[str, int | str] = field(default_factory=dict)  # ShapesSpec overrides (style: plain | hard)


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

        return Path(cfg.root) if cfg.root else export_shapes(ShapesSpec.from_overrides(cfg.shapes))
    if cfg.dataset != "coco":
        raise AnnotationError(f"data.dataset={cfg.dataset!r}: expected 'coco' or 'shapes'")
    if not cfg.root:
        raise AnnotationError("data.root is not set: pass --data ROOT (COCO layout) or set data.train_ann etc.")
    return Path(cfg.root)


# What is refused, skipped, clipped or dropped (mmdetection's CocoDataset / LoadAnnotations are the
# reference, so that COCO 2017 itself loads unchanged):
# * refused (AnnotationError naming the file): duplicate image or annotation ids, a file_name that
#   is absolute or climbs out of the image folder with '..', an image whose decoded size is not the
#   json's width x height (when it is read), an RLE of another size than its image; and, unless
#   data.drop_invalid (then dropped with a counted warning), an annotation with an unknown image or
#   category, no [x, y, w, h] bbox, a negative width or height, or a box more than BOX_TOLERANCE
#   pixels outside its image;
# * skipped (one counted warning per file): boxes with a side under one pixel (mmdet: w < 1 or
#   h < 1; tested before the outside test) and boxes with no area left inside the image once clipped;
# * clipped: boxes up to BOX_TOLERANCE pixels outside the image, to the image;
# * dropped (mask models, one counted warning per file): polygons with fewer than 3 points or an
#   odd number of coordinates; an instance left with no polygon keeps its box and label, gets an
#   all-zero mask and ``mask_valid`` False (see CocoDetection).
BOX_TOLERANCE = 1.0


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _unique_ids(ann_file: Path, items: list[Any], key: str) -> None:
    """Refuse a list of COCO records (``images`` / ``annotations``) whose ids repeat."""
    first: dict[Any, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item:
            raise AnnotationError(f"{ann_file}: {key}[{i}] has no 'id'; every COCO {key[:-1]} needs a unique id")
        j = first.setdefault(item["id"], i)
        if j != i:
            names = f" ({items[j].get('file_name')} and {item.get('file_name')})" if key == "images" else ""
            raise AnnotationError(
                f"{ann_file}: {key}[{j}] and {key}[{i}] both have id {item['id']}{names}; ids must be unique"
            )


def _escapes(name: str) -> bool:
    """Whether an image ``file_name`` is absolute (POSIX or Windows) or climbs out with ``..``:
    names derived from it (pictures, results) must stay inside the folders they are written to."""
    parts = name.replace("\\", "/").split("/")
    return not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive != "" or ".." in parts


def valid_polygon(poly: object) -> bool:
    """At least 3 points and an even number of coordinates (mmdetection's test; the coordinates
    themselves are not inspected: COCO 2017 holds millions of them)."""
    return isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0


class CocoDetection(Dataset[tuple[Any, dict[str, Any]]]):
    """One COCO split -> ``(image [3, H, W] float in 0..1, target)`` with ``boxes`` (XYXY, pixels),
    ``labels`` (contiguous, starting at ``label_offset``), ``image_id`` and, with ``masks``,
    ``masks`` ``[N, H, W]`` uint8 and ``mask_valid`` ``[N]`` bool. Crowd regions are left out of
    the targets (COCO evaluation handles them from the json).

    An instance whose polygons were all degenerate has ``mask_valid`` False and an all-zero mask:
    its box and label still train the box losses; a mask loss that reads ``mask_valid`` leaves it
    out (torchvision's ``maskrcnn_loss`` has no per-instance weight and does not read it). The
    module comment above lists what is refused, skipped, clipped or dropped."""

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
            if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
                raise AnnotationError(f"{self.ann_file}: no '{key}' list; expected COCO instances format")
        _unique_ids(self.ann_file, coco["images"], "images")
        _unique_ids(self.ann_file, coco["annotations"], "annotations")
        for im in coco["images"]:
            self._check_image(im)
        self.categories = sorted(coco["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in self.categories]
        self.class_names = [c["name"] for c in self.categories]
        self.cat_to_label = {cid: i + label_offset for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.images = {im["id"]: im for im in coco["images"]}
        self.ids = sorted(self.images)
        self.masks, self.train = masks, train
        self.dropped = 0  # malformed annotations dropped under drop_invalid
        self.skipped = {"a side under 1 pixel": 0, "no area inside the image": 0}
        self.dropped_polygons = self.maskless = 0
        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in self.ids}
        for ann in coco["annotations"]:
            problem = self._check(ann)
            if problem is not None:
                if not drop_invalid:
                    raise AnnotationError(f"{problem}; fix the annotation or set data.drop_invalid=true to drop it")
                self.dropped += 1
                continue
            kept = self._tidy(ann)
            if kept is not None:
                per_image[ann["image_id"]].append(kept)
        self._warn()
        self.anns = per_image
        self.transform = train_transform(hflip, crop, crop_resize, crop_size) if train else v2.Identity()

    def _check_image(self, im: object) -> None:
        if not isinstance(im, dict):
            raise AnnotationError(f"{self.ann_file}: an 'images' entry is not an object: {im!r}")
        where = f"{self.ann_file}: image id {im['id']}"
        name = im.get("file_name")
        if not isinstance(name, str) or _escapes(name):
            raise AnnotationError(
                f"{where} has file_name {name!r}, which is absolute or climbs out with '..'; file names must "
                f"stay inside the image folder ({self.image_dir}): write them relative to it"
            )
        for key in ("width", "height"):
            if not isinstance(im.get(key), int) or im[key] <= 0:
                raise AnnotationError(f"{where} ({name}) has {key} {im.get(key)!r}; expected a positive integer")

    def _check(self, ann: dict[str, Any]) -> str | None:
        """The reason a malformed annotation is refused (or, under drop_invalid, dropped), else None."""
        where = f"{self.ann_file}: annotation id {ann.get('id')}"
        image = self.images.get(ann.get("image_id"))  # type: ignore[arg-type]
        if image is None:
            return f"{where} refers to unknown image id {ann.get('image_id')}"
        where += f" (image {image['file_name']})"
        if ann.get("category_id") not in self.cat_to_label:
            return f"{where} has unknown category id {ann.get('category_id')}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            return f"{where} has no [x, y, w, h] bbox"
        x, y, w, h = bbox
        if w < 0 or h < 0:
            return f"{where} has a box of negative size {bbox}"
        W, H, t = image["width"], image["height"], BOX_TOLERANCE
        if min(w, h) >= 1 and (x < -t or y < -t or x + w > W + t or y + h > H + t):
            return f"{where} has box {bbox} more than {t:g} pixel outside the {W}x{H} image"
        seg = ann.get("segmentation")
        if self.masks and isinstance(seg, dict):
            if "counts" not in seg or not isinstance(seg.get("size"), list):
                return f"{where} has an RLE mask without 'counts' and 'size'"
            if list(seg["size"]) != [H, W]:
                return f"{where} has an RLE mask of size {seg['size']} for a {H}x{W} image (size is [height, width])"
        elif self.masks and seg is not None and not isinstance(seg, list):
            return f"{where} has a segmentation that is neither polygons nor an RLE"
        return None

    def _tidy(self, ann: dict[str, Any]) -> dict[str, Any] | None:
        """A checked annotation as it enters the targets: None when skipped (a side under one
        pixel, or no area once clipped), else with its box clipped to the image and, for mask
        models, its degenerate polygons removed."""
        image = self.images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        if w < 1 or h < 1:  # mmdetection: `if w < 1 or h < 1: continue`
            self.skipped["a side under 1 pixel"] += 1
            return None
        x1, y1 = max(x, 0), max(y, 0)
        x2, y2 = min(x + w, image["width"]), min(y + h, image["height"])
        if x2 <= x1 or y2 <= y1:
            self.skipped["no area inside the image"] += 1
            return None
        kept = {**ann, "bbox": [x1, y1, x2 - x1, y2 - y1]}
        seg = ann.get("segmentation")
        if self.masks and not isinstance(seg, dict):
            polygons = [p for p in seg or [] if valid_polygon(p)]
            self.dropped_polygons += len(seg or []) - len(polygons)
            self.maskless += not polygons and not ann.get("iscrowd", 0)
            kept["segmentation"] = polygons
        return kept

    def _warn(self) -> None:
        """One counted warning per kind and file."""
        if self.dropped:
            warnings.warn(f"{self.ann_file}: dropped {self.dropped} malformed annotation(s)", stacklevel=3)
        skipped = [f"{n} box(es) with {why}" for why, n in self.skipped.items() if n]
        if skipped:
            warnings.warn(f"{self.ann_file}: skipped {' and '.join(skipped)} (as mmdetection does)", stacklevel=3)
        if self.dropped_polygons or self.maskless:
            warnings.warn(
                f"{self.ann_file}: dropped {self.dropped_polygons} polygon(s) with fewer than 3 points or an odd "
                f"number of coordinates; {self.maskless} instance(s) left without a mask are kept for the box "
                "losses only (mask_valid=False)",
                stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.ids)

    def _mask(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        """``[h, w]`` uint8; all zero for an instance without a valid polygon."""
        from pycocotools import mask as mask_utils

        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons, already checked
            if not seg:
                return np.zeros((h, w), np.uint8)
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_utils.decode(rle)

    def _load(self, image_id: int) -> Image.Image:
        """The RGB image, refused if its size is not the json's (its boxes would be mis-scaled)."""
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except OSError as e:
            raise AnnotationError(f"{path}: cannot read this image ({e})") from e
        if pil.size != (info["width"], info["height"]):
            raise AnnotationError(
                f"{path}: the image is {pil.width}x{pil.height} pixels but {self.ann_file} says "
                f"{info['width']}x{info['height']} (image id {image_id}); fix the json's width/height if its "
                "boxes were drawn on this image, else put back the image the json was made for"
            )
        return pil

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        pil = self._load(image_id)
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
            target["mask_valid"] = torch.tensor([a["segmentation"] != [] for a in anns], dtype=torch.bool)
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
        sanitize = v2.SanitizeBoundingBoxes(labels_getter=_labels_and_flags)
        steps += [v2.RandomApply([policy], p=crop), v2.ClampBoundingBoxes(), sanitize]
    return v2.Compose(steps) if steps else v2.Identity()


def _labels_and_flags(inputs: Any) -> Any:
    """What SanitizeBoundingBoxes removes with the boxes it drops: the labels and, for mask
    models, the per-instance ``mask_valid`` flags (a plain tensor it would otherwise leave)."""
    target = inputs[1]
    return (target["labels"], target["mask_valid"]) if "mask_valid" in target else target["labels"]


def collate(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
