"""Segmentation data: label-map formats and errors, layouts, the training transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.functional import max_pool2d

from pvt.segmentation.data import (
    ADE20K_CLASSES,
    LabelError,
    SegmentationData,
    SegmentationFolder,
    TrainTransform,
    class_names,
    read_label,
    split_folders,
)


def _pair(root: Path, label: Image.Image, size: tuple[int, int] | None = None, name: str = "a") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "lbl").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size or label.size, (10, 20, 30)).save(root / "img" / f"{name}.jpg")
    label.save(root / "lbl" / f"{name}.png")
    return root


def test_grey_palette_and_16_bit_labels_read_as_indices(tmp_path: Path) -> None:
    values = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "grey.png")
    pal = Image.new("P", (2, 2))
    pal.putdata(values.reshape(-1).tolist())
    pal.putpalette([200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * 759)  # colours must not leak into labels
    pal.save(tmp_path / "pal.png")
    Image.fromarray(values.astype(np.uint16) * 100).save(tmp_path / "deep.png")
    assert read_label(tmp_path / "grey.png", num_classes=3).tolist() == [[0, 1], [2, 255]]
    assert read_label(tmp_path / "pal.png", num_classes=3).tolist() == [[0, 1], [2, 255]]
    deep = read_label(tmp_path / "deep.png", num_classes=201, ignore_index=25500)
    assert deep.tolist() == [[0, 100], [200, 25500]]


def test_reduce_zero_label_and_bad_values(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 1], [150, 255]], np.uint8)).save(tmp_path / "ade.png")
    assert read_label(tmp_path / "ade.png", num_classes=150, reduce_zero_label=True).tolist() == [[255, 0], [149, 255]]
    Image.fromarray(np.array([[0, 7]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(LabelError, match=r"bad\.png: label values \[7\] are outside 0\.\.4"):
        read_label(tmp_path / "bad.png", num_classes=5)
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(LabelError, match=r"rgb\.png: a RGB image; label maps must hold one class index"):
        read_label(tmp_path / "rgb.png", num_classes=5)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(LabelError, match=r"junk\.png: cannot read"):
        read_label(tmp_path / "junk.png", num_classes=5)


def test_size_mismatch_and_missing_labels_are_named(tmp_path: Path) -> None:
    root = _pair(tmp_path, Image.fromarray(np.zeros((4, 6), np.uint8)), size=(6, 5))
    ds = SegmentationFolder(root / "img", root / "lbl", num_classes=3)
    with pytest.raises(LabelError, match=r"a\.png: label map is 6x4 but its image .*a\.jpg is 6x5"):
        ds[0]
    Image.new("RGB", (6, 4)).save(root / "img" / "b.jpg")
    with pytest.raises(LabelError, match=r"no label PNG for 1 image\(s\), e\.g\. \['b\.jpg'\]"):
        SegmentationFolder(root / "img", root / "lbl", num_classes=3)


def test_folder_sample_and_layouts(tmp_path: Path) -> None:
    root = _pair(tmp_path, Image.fromarray(np.array([[0, 1, 2]], np.uint8)))
    image, label, name = SegmentationFolder(root / "img", root / "lbl", num_classes=3)[0]
    assert image.shape == (3, 1, 3) and image.dtype == torch.float32 and label.tolist() == [[0, 1, 2]]
    assert name == "a.jpg"
    ade = SegmentationData(root="/data/ade")
    assert split_folders(ade, "val") == (Path("/data/ade/images/validation"), Path("/data/ade/annotations/validation"))
    assert class_names(ade, 150) == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    with pytest.raises(LabelError, match=r"needs data\.train_images and data\.train_labels"):
        split_folders(SegmentationData(dataset="folders"), "train")
    with pytest.raises(LabelError, match=r"data\.classes has 2 names but model\.num_classes=3"):
        class_names(SegmentationData(dataset="folders", classes=["x", "y"]), 3)


def test_train_transform_keeps_image_and_label_aligned() -> None:
    """Label k is painted with colour 60k everywhere: after rescale, crop, flip and padding, image
    and label still agree pixel for pixel (away from resampled edges); padding is ignored."""
    torch.manual_seed(0)
    label = torch.zeros(40, 60, dtype=torch.int64)
    label[5:30, 10:25], label[20:38, 35:55] = 1, 2
    image = (label * 60).to(torch.uint8).expand(3, -1, -1).clone()
    t = TrainTransform(scale=(120, 40), ratio_range=(0.5, 1.5), crop_size=(32, 48), photometric=False)
    padded = 0
    for _ in range(20):
        img, lbl = t(image, label)
        assert img.shape == (3, 32, 48) and lbl.shape == (32, 48) and img.dtype == torch.uint8
        valid = lbl != 255
        padded += int((~valid).sum())
        # Resampling blends colours within 2 px of a class boundary (also one the crop cut away
        # at its border); everywhere else they must agree.
        l = lbl.float()[None, None]
        near_edge = (max_pool2d(l, 5, 1, 2) != -max_pool2d(-l, 5, 1, 2))[0, 0]
        near_edge[:2], near_edge[-2:], near_edge[:, :2], near_edge[:, -2:] = True, True, True, True
        inside = valid & ~near_edge
        assert inside.sum() > 100
        assert torch.equal((img[0][inside].float() / 60).round().long(), lbl[inside])
    assert padded > 0  # small rescales are padded with the ignore index


def test_cat_max_ratio_prefers_crops_with_several_classes() -> None:
    """mmseg's rule: retry the crop (up to 10 times) while one class fills 75% of it or more."""
    torch.manual_seed(0)
    label = torch.zeros(100, 100, dtype=torch.int64)
    label[50:, 50:] = 1  # a corner object; most random 40x40 crops are almost pure background
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    kw = dict(scale=(100, 100), ratio_range=(1.0, 1.0), crop_size=(40, 40), hflip=0.0, photometric=False)
    mixed = {}
    for ratio in (0.75, 1.0):
        t = TrainTransform(cat_max_ratio=ratio, **kw)  # type: ignore[arg-type]
        crops = [t(image, label)[1] for _ in range(40)]
        mixed[ratio] = sum(bool(0.25 < (c == 1).float().mean() < 0.75) for c in crops)
    assert mixed[0.75] >= 36 and mixed[1.0] <= 20
