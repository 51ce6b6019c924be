"""Semantic segmentation data: image / label-map pairs, checked labels, the papers' mmseg transforms.

Layouts (``data.dataset``):

* ``ade20k``: ``ROOT/images/{training,validation}/*.jpg`` with ``ROOT/annotations/{...}/*.png``;
  label 0 ("other") is ignored and 1..150 become 0..149 (mmseg's ``reduce_zero_label``).
* ``folders``: any image folder / label folder pair (``data.train_images`` ... ``data.val_labels``),
  labels matched by file stem, with ``data.classes``, ``data.ignore_index``, ``data.reduce_zero_label``.
* ``shapes``: the embedded synthetic scenes (``pvt.datasets.shapes``), background included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from pvt.engine.task import LoaderConfig
from pvt.utils.cache import IMAGE_EXTENSIONS

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


class LabelError(ValueError):
    """A bad image / label pair; the message names the file and the fix."""


@dataclass
class SegmentationData(LoaderConfig):
    """The ``data`` section of a segmentation recipe."""

    root: str | None = None
    dataset: str = "ade20k"  # ade20k | folders | shapes
    train_images: str | None = None  # folders layout (explicit paths also override ade20k's)
    train_labels: str | None = None
    val_images: str | None = None
    val_labels: str | None = None
    classes: list[str] = field(default_factory=list)  # names (default: ADE20K's, shapes' or "0", "1", ...)
    ignore_index: int = 255
    reduce_zero_label: bool | None = None  # None: true for ade20k, false otherwise
    # Training (mmseg): resize to scale x ratio keeping the aspect, crop (cat_max_ratio), flip,
    # photometric distortion, pad to the crop size.
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # (long, short) bound
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list[int] = field(default_factory=lambda: [512, 512])  # (h, w)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    # Evaluation: whole image resized into eval_scale keeping the aspect, sides aligned to ``align``;
    # or sliding windows of crop_size; optional flip and extra scale ratios (test-time augmentation).
    eval_scale: list[int] = field(default_factory=lambda: [2048, 512])
    align: int = 32
    eval_mode: str = "whole"  # whole | slide
    slide_stride: list[int] = field(default_factory=lambda: [341, 341])
    eval_flip: bool = False
    eval_ratios: list[float] = field(default_factory=lambda: [1.0])
    shapes: dict[str, int | str] = field(default_factory=dict)  # ShapesSpec overrides (style: plain | hard)


def split_folders(cfg: SegmentationData, split: str) -> tuple[Path, Path]:
    """(image folder, label folder) of ``train`` or ``val``."""
    images = cfg.train_images if split == "train" else cfg.val_images
    labels = cfg.train_labels if split == "train" else cfg.val_labels
    if images and labels:
        return Path(images), Path(labels)
    if cfg.dataset == "folders":
        raise LabelError(f"data.dataset=folders needs data.{split}_images and data.{split}_labels")
    if cfg.dataset == "shapes":
        from pvt.datasets.shapes import ShapesSpec, export_shapes

        root = Path(cfg.root) if cfg.root else export_shapes(ShapesSpec.from_overrides(cfg.shapes))
        return root / f"{split}2017", root / f"semantic_{split}2017"
    if cfg.dataset != "ade20k":
        raise LabelError(f"data.dataset={cfg.dataset!r}: expected 'ade20k', 'folders' or 'shapes'")
    if not cfg.root:
        raise LabelError("data.root is not set: pass --data ROOT (ADE20K layout) or set data.train_images etc.")
    sub = "training" if split == "train" else "validation"
    return Path(cfg.root) / "images" / sub, Path(cfg.root) / "annotations" / sub


def class_names(cfg: SegmentationData, num_classes: int) -> list[str]:
    if cfg.classes:
        if len(cfg.classes) != num_classes:
            raise LabelError(f"data.classes has {len(cfg.classes)} names but model.num_classes={num_classes}")
        return list(cfg.classes)
    if cfg.dataset == "ade20k" and num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    if cfg.dataset == "shapes":
        from pvt.datasets.shapes import CLASSES

        names = ["background", *CLASSES]
        if len(names) == num_classes:
            return names
    return [str(i) for i in range(num_classes)]


def read_label(path: Path, *, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> np.ndarray:
    """A label PNG -> ``[H, W]`` int64 class indices, ``ignore_index`` where not scored.

    8-bit grey, palette (the indices, not the colours) and 16-bit PNGs are read as indices;
    colour images and out-of-range values are refused with a message naming the file.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I;16B", "I", "1"):
                raise LabelError(
                    f"{path}: a {im.mode} image; label maps must hold one class index per pixel "
                    "(8-bit grey, palette or 16-bit PNG), not colours"
                )
            label = np.asarray(im, dtype=np.int64)
    except OSError as e:
        raise LabelError(f"{path}: cannot read this label map ({e})") from e
    if reduce_zero_label:  # mmseg: 0 ("other") -> ignored, k -> k - 1
        ignored = (label == 0) | (label == ignore_index)
        label = label - 1
        label[ignored] = ignore_index
    bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    if bad.any():
        values = np.unique(label[bad])[:8].tolist()
        raise LabelError(
            f"{path}: label values {values} are outside 0..{num_classes - 1} and not the ignore index "
            f"{ignore_index}; set model.num_classes, data.ignore_index or data.reduce_zero_label to match"
        )
    return label


class SegmentationFolder(Dataset[tuple[Tensor, Tensor, str]]):
    """Image / label pairs matched by stem -> ``(image [3, H, W] float 0..1, label [H, W] int64, name)``.

    Training samples pass through ``transform``; evaluation samples stay at their own size
    (:func:`pvt.segmentation.inference.infer` resizes them and scores at the label's size).
    """

    def __init__(
        self,
        image_dir: str | Path,
        label_dir: str | Path,
        *,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        transform: TrainTransform | None = None,
    ) -> None:
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        for d, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not d.is_dir():
                raise LabelError(f"{d}: {what} folder not found")
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.images:
            raise LabelError(f"{self.image_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        labels = {p.stem: p for p in self.label_dir.iterdir() if p.suffix.lower() == ".png"}
        missing = [p.name for p in self.images if p.stem not in labels]
        if missing:
            raise LabelError(
                f"{self.label_dir}: no label PNG for {len(missing)} image(s), e.g. {missing[:3]} "
                f"(labels are matched to {self.image_dir} by file stem)"
            )
        self.labels = [labels[p.stem] for p in self.images]
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str]:
        path, label_path = self.images[index], self.labels[index]
        try:
            with Image.open(path) as im:
                image = v2.functional.pil_to_tensor(im.convert("RGB"))  # [3, H, W] uint8
        except OSError as e:
            raise LabelError(f"{path}: cannot read this image ({e})") from e
        label = read_label(
            label_path,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            reduce_zero_label=self.reduce_zero_label,
        )
        if label.shape != tuple(image.shape[-2:]):
            raise LabelError(
                f"{label_path}: label map is {label.shape[1]}x{label.shape[0]} but its image {path} is "
                f"{image.shape[-1]}x{image.shape[-2]}; they must match pixel for pixel"
            )
        target = torch.from_numpy(label)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return v2.functional.to_dtype(image, torch.float32, scale=True), target, path.name


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


class PhotoMetricDistortion:
    """mmseg's ``PhotoMetricDistortion`` on uint8 ``[3, H, W]``: each step with probability 0.5 -
    brightness +-32, contrast x0.5-1.5 (before or after the colour steps), saturation x0.5-1.5,
    hue +-18 (OpenCV units, i.e. +-36 degrees). Saturation is torchvision's grey blend where mmseg
    scales HSV saturation: the same range, a slightly different curve."""

    def __call__(self, image: Tensor) -> Tensor:
        x = image.float()
        if torch.rand(()) < 0.5:
            x = (x + _uniform(-32, 32)).clamp(0, 255)
        contrast_first = bool(torch.rand(()) < 0.5)
        do_contrast, alpha = bool(torch.rand(()) < 0.5), _uniform(0.5, 1.5)
        if contrast_first and do_contrast:
            x = (x * alpha).clamp(0, 255)
        x = x / 255
        if torch.rand(()) < 0.5:
            x = v2.functional.adjust_saturation(x, _uniform(0.5, 1.5))
        if torch.rand(()) < 0.5:
            x = v2.functional.adjust_hue(x, float(torch.randint(-18, 19, ())) / 180)
        x = x * 255
        if not contrast_first and do_contrast:
            x = (x * alpha).clamp(0, 255)
        return x.round().to(torch.uint8)


class TrainTransform:
    """mmseg's training pipeline on ``(image uint8 [3, H, W], label int64 [H, W])``.

    Random rescale into ``scale x ratio`` (keep ratio) -> random crop where no class fills more
    than ``cat_max_ratio`` (10 tries) -> horizontal flip -> photometric distortion -> pad to the
    crop size (image 0, label ``ignore_index``). Randomness comes from torch's RNG, which the
    engine seeds per sample.
    """

    def __init__(
        self,
        *,
        scale: tuple[int, int] = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        crop_size: tuple[int, int] = (512, 512),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
    ) -> None:
        self.scale, self.ratio_range, self.crop_size = scale, ratio_range, crop_size
        self.cat_max_ratio, self.hflip, self.ignore_index = cat_max_ratio, hflip, ignore_index
        self.photometric = PhotoMetricDistortion() if photometric else None

    def _crop_box(self, label: Tensor) -> tuple[int, int, int, int]:
        H, W = label.shape
        ch, cw = min(self.crop_size[0], H), min(self.crop_size[1], W)
        for _ in range(10):
            top = int(torch.randint(0, H - ch + 1, ()))
            left = int(torch.randint(0, W - cw + 1, ()))
            if self.cat_max_ratio >= 1:
                break
            crop = label[top : top + ch, left : left + cw]
            _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left, ch, cw

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        F = v2.functional
        H, W = image.shape[-2:]
        r = _uniform(*self.ratio_range)
        long_side, short_side = self.scale[0] * r, self.scale[1] * r
        f = min(long_side / max(H, W), short_side / min(H, W))
        size = [max(1, int(H * f + 0.5)), max(1, int(W * f + 0.5))]
        image = F.resize(image, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        # nearest-exact samples pixel centres, as the bilinear image resize does (plain nearest is off by up to 1 px)
        label = F.resize(label[None], size, interpolation=v2.InterpolationMode.NEAREST_EXACT)[0]
        top, left, ch, cw = self._crop_box(label)
        image, label = F.crop(image, top, left, ch, cw), F.crop(label, top, left, ch, cw)
        if torch.rand(()) < self.hflip:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric is not None:
            image = self.photometric(image)
        pad_h, pad_w = self.crop_size[0] - ch, self.crop_size[1] - cw
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0)
            label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image, label


def eval_size(h: int, w: int, scale: tuple[int, int], ratio: float = 1.0, align: int = 32) -> tuple[int, int]:
    """mmseg's ``AlignResize``: keep-ratio rescale into ``scale x ratio`` (long, short bound), then
    each side up to a multiple of ``align``."""
    f = min(scale[0] * ratio / max(h, w), scale[1] * ratio / min(h, w))
    nh, nw = int(h * f + 0.5), int(w * f + 0.5)
    return max(align, math.ceil(nh / align) * align), max(align, math.ceil(nw / align) * align)


def collate(batch: list[tuple[Tensor, Tensor, str]]) -> tuple[Any, Any, list[str]]:
    """Training crops share one size and stack; evaluation images keep their own (lists)."""
    images, labels, names = zip(*batch, strict=True)
    if len({tuple(i.shape) for i in images}) == 1:
        return torch.stack(images), torch.stack(labels), list(names)
    return list(images), list(labels), list(names)
