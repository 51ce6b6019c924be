"""Classification data: checked ImageFolder datasets, timm transforms, the embedded digits set."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pvt.engine.task import LoaderConfig
from pvt.utils.cache import IMAGE_EXTENSIONS, cache_dir
from pvt.utils.constants import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from pvt.engine.config import Recipe
    from pvt.hub import WeightsSource


class DataError(ValueError):
    """Bad training data; the message names the file or folder and the fix."""


@dataclass
class ClassificationData(LoaderConfig):
    """The ``data`` section of a classification recipe (the papers' ImageNet pipeline by default)."""

    root: str | None = None  # ImageFolder root with train/ and val/ (None: the dataset's cache)
    dataset: str = "imagefolder"  # imagefolder | digits (embedded, exported on first use)
    train_split: str = "train"
    val_split: str = "val"
    input_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize 256, center crop 224
    crop_mode: str = "center"  # eval: center (resize input_size / crop_pct, crop) | squash (resize to input_size^2)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = 0.4
    reprob: float = 0.25
    remode: str = "pixel"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    repeated_aug: int = 3  # repeats per image per epoch (1: off)
    skip_bad: bool = False  # verify every image first and skip unreadable ones with a warning


def load_image(path: str) -> Image.Image:
    return _pil_loader(path)


def _pil_loader(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(
            f"{path}: cannot read this image ({e}); replace or delete it, or set data.skip_bad=true "
            "to skip unreadable images"
        ) from e


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


class CheckedImageFolder(Dataset[tuple[Any, int]]):
    """``root/<class>/<image>`` with the checks torchvision's ImageFolder leaves out: a clear error
    for an empty class folder, a class list that differs from the training split's, and an
    unreadable image (or, with ``skip_bad``, a verified list with a counted warning)."""

    def __init__(
        self,
        root: str | Path,
        transform: Any = None,
        *,
        classes: list[str] | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: folder not found; expected an ImageFolder split (one folder per class)")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DataError(f"{self.root}: no class folders; expected {self.root}/<class>/<image>")
        if classes is not None and found != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DataError(
                f"{self.root}: class folders differ from the training split's (extra {extra}, missing "
                f"{missing}); both splits need the same class folders"
            )
        self.classes = found
        self.class_to_idx = {c: i for i, c in enumerate(found)}
        self.samples: list[tuple[str, int]] = []
        for c in found:
            files = sorted(
                str(p) for p in (self.root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not files:
                raise DataError(f"{self.root / c}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
            self.samples += [(f, self.class_to_idx[c]) for f in files]
        if skip_bad:
            good = [s for s in self.samples if _readable(s[0])]
            skipped = len(self.samples) - len(good)
            if skipped:
                warnings.warn(f"{self.root}: skipped {skipped} unreadable image(s)", stacklevel=2)
            self.samples = good
            self.skipped = skipped
        self.transform = transform
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = _pil_loader(path)
        return (self.transform(image) if self.transform is not None else image), target


def build_transforms(cfg: ClassificationData, *, train: bool) -> Any:
    """timm's ImageNet transforms, configured from the recipe."""
    from timm.data.transforms_factory import create_transform

    if train:
        return create_transform(
            cfg.input_size,
            is_training=True,
            scale=cfg.scale,
            ratio=cfg.ratio,
            hflip=cfg.hflip,
            # None, not 0.0: timm's ColorJitter(0) changes nothing but still draws an order and costs
            # ~0.05 ms an image, a fifth of a digits image's whole transform. timm skips the
            # transform on None (`if color_jitter is not None`) though its annotation omits it.
            color_jitter=cfg.color_jitter or None,  # type: ignore[arg-type]
            auto_augment=cfg.auto_augment,
            interpolation=cfg.interpolation,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            mean=cfg.mean,
            std=cfg.std,
        )
    return create_transform(
        cfg.input_size,
        is_training=False,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        mean=cfg.mean,
        std=cfg.std,
    )


def export_digits(root: Path | None = None) -> Path:
    """scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped inside the
    package) as an ImageFolder: a stratified 80/20 train/val split, written once, atomically."""
    root = root or cache_dir() / "digits"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=digits.target)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for i in ids:
                d = tmp / split / str(int(digits.target[i]))
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(d / f"{i:04d}.png")
        if not (root / "train").is_dir():
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def dataset_root(cfg: ClassificationData) -> Path:
    if cfg.dataset == "digits":
        return Path(cfg.root) if cfg.root else export_digits()
    if cfg.dataset != "imagefolder":
        raise DataError(f"data.dataset={cfg.dataset!r}: expected 'imagefolder' or 'digits'")
    if not cfg.root:
        raise DataError("data.root is not set: pass --data DIR (an ImageFolder with train/ and val/)")
    return Path(cfg.root)


def build_datasets(
    cfg: ClassificationData, *, train: bool = True
) -> tuple[CheckedImageFolder | None, CheckedImageFolder]:
    root = dataset_root(cfg)
    if cfg.dataset == "digits" and cfg.root:
        export_digits(root)
    train_ds = None
    classes = None
    if train:
        train_ds = CheckedImageFolder(root / cfg.train_split, build_transforms(cfg, train=True), skip_bad=cfg.skip_bad)
        classes = train_ds.classes
    else:
        split = root / cfg.train_split
        if split.is_dir():
            classes = sorted(d.name for d in split.iterdir() if d.is_dir() and not d.name.startswith("."))
    val_ds = CheckedImageFolder(
        root / cfg.val_split,
        build_transforms(cfg, train=False),
        classes=classes or None,
        skip_bad=cfg.skip_bad,
    )
    return train_ds, val_ds


def imagenet_source(recipe: Recipe) -> WeightsSource | None:
    """The ``pvt.hub.WeightsSource`` of ``model.pretrained`` when the model keeps its ImageNet head
    (1000 classes), else None. Reads the sources table only; nothing is downloaded."""
    m = recipe.model
    if not m.pretrained or m.num_classes != 1000:
        return None
    from pvt.hub import get_source

    return get_source(m.name, None if m.pretrained is True else str(m.pretrained), task="imagenet")


def eval_data(recipe: Recipe) -> ClassificationData:
    """The recipe's data section with the evaluation transform of its published ImageNet weights
    (input size, crop_pct, crop mode, interpolation, mean, std), or unchanged when it has none."""
    data: ClassificationData = recipe.data
    source = imagenet_source(recipe)
    if source is None or source.eval_transform is None:
        return data
    t = source.eval_transform
    return dataclasses.replace(
        data, input_size=t.input_size, crop_pct=t.crop_pct, crop_mode=t.crop_mode,
        interpolation=t.interpolation, mean=t.mean, std=t.std,
    )  # fmt: skip
