"""Detection data: the synthetic scenes, COCO-format edge cases, and evaluation through pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pvt.datasets.shapes import CLASSES, ShapesSpec, export_shapes
from pvt.detection.data import AnnotationError, CocoDetection
from pvt.detection.evaluate import STAT_NAMES, coco_evaluate, to_coco_results

TINY = ShapesSpec(image_size=64, train_images=6, val_images=3, min_size=12, max_size=40)


def test_shapes_layout_masks_and_semantic_maps(tmp_path: Path) -> None:
    root = export_shapes(TINY, tmp_path / "shapes")
    assert export_shapes(TINY, tmp_path / "shapes") == root  # second call reuses it
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    assert len(coco["images"]) == 6 and coco["annotations"]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    for ann in coco["annotations"]:
        m = mask_utils.decode(ann["segmentation"])
        assert m.sum() == ann["area"]
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
        name = next(im["file_name"] for im in coco["images"] if im["id"] == ann["image_id"])
        semantic = np.asarray(Image.open(root / "semantic_train2017" / name))
        assert (semantic[m.astype(bool)] == ann["category_id"]).all()  # visible pixels carry the class
    again = export_shapes(TINY, tmp_path / "other")
    assert (again / "train2017" / "000000.png").read_bytes() == (root / "train2017" / "000000.png").read_bytes()


def test_shapes_hard_style_full_extent_boxes_and_own_cache(tmp_path: Path) -> None:
    hard = ShapesSpec(image_size=64, train_images=6, val_images=3, min_size=12, max_size=40, style="hard")
    assert hard.folder_name() != TINY.folder_name() and "hard" in hard.folder_name()
    assert "plain" not in TINY.folder_name()  # the plain style keeps the caches it had
    root = export_shapes(hard, tmp_path / "hard")
    plain = export_shapes(TINY, tmp_path / "plain")
    assert (root / "train2017" / "000000.png").read_bytes() != (plain / "train2017" / "000000.png").read_bytes()
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    occluded = 0
    for ann in coco["annotations"]:
        m = mask_utils.decode(ann["segmentation"])
        assert m.sum() == ann["area"] >= 16
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert x <= xs.min() and y <= ys.min() and xs.max() < x + w and ys.max() < y + h  # box holds the mask
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        occluded += (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) != (x, y, x + w, y + h)
    assert occluded, "an occluded object's box keeps its full extent"
    with pytest.raises(ValueError, match="style"):
        ShapesSpec(style="busy")


def _fixture(tmp_path: Path, anns: list[dict]) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (100, 100, 100)).save(img_dir / name)
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }  # fmt: skip
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(coco))
    return ann_file, img_dir


GOOD = [
    {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
     "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
    {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 5, 10, 10], "area": 100, "iscrowd": 1,
     "segmentation": mask_utils.encode(np.asfortranarray(np.ones((30, 40), np.uint8)))},
]  # fmt: skip
GOOD[1]["segmentation"]["counts"] = GOOD[1]["segmentation"]["counts"].decode()


def test_coco_targets_labels_crowd_and_empty_images(tmp_path: Path) -> None:
    ds = CocoDetection(*_fixture(tmp_path, GOOD), train=False, masks=True, label_offset=1)
    assert ds.class_names == ["cat", "dog"] and ds.cat_to_label == {3: 1, 7: 2}
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and image.max() <= 1
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]  # crowd region left out
    assert target["labels"].tolist() == [2]
    assert target["masks"].shape == (1, 30, 40) and target["masks"][0, 5, 5] == 1
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 40)


def test_horizontal_flip_moves_boxes_and_masks_together(tmp_path: Path) -> None:
    ds = CocoDetection(*_fixture(tmp_path, GOOD), train=True, masks=True, hflip=1.0)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[28.0, 3.0, 38.0, 11.0]]
    _, xs = torch.nonzero(t["masks"][0], as_tuple=True)
    assert xs.min() >= 27 and xs.max() <= 38


def test_crop_policy_keeps_boxes_masks_and_labels_consistent(tmp_path: Path) -> None:
    """The 3x recipe's resize-then-crop: short side 60, crops of 20-40 px; boxes that fall outside
    the crop go with their labels and masks, the rest stay inside the crop and cover their mask."""
    ds = CocoDetection(
        *_fixture(tmp_path, GOOD), train=True, masks=True, hflip=0.0, crop=1.0, crop_resize=(60,), crop_size=(20, 40)
    )
    sizes, counts = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, t = ds[0]
        h, w = image.shape[-2:]
        assert 20 <= h <= 40 and 20 <= w <= 40 and t["masks"].shape[-2:] == (h, w)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        for box, mask in zip(t["boxes"], t["masks"], strict=True):
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
        sizes.add((h, w))
        counts.add(len(t["boxes"]))
    assert len(sizes) > 5 and counts == {0, 1}  # crops vary; the object is sometimes cut away


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"bbox": [35, 3, 10, 8]}, r"annotation id 9 \(image a.png\) has box .* outside the 40x30 image"),
        ({"bbox": [2, 3, -1, 8]}, "negative size"),
        ({"category_id": 5}, "unknown category id 5"),
        ({"image_id": 99}, "unknown image id 99"),
        ({"segmentation": {"size": [10, 10], "counts": "PP1"}}, r"RLE mask of size \[10, 10\] for a 30x40"),
    ],
)
def test_malformed_annotations_are_named(tmp_path: Path, bad: dict, message: str) -> None:
    ann = {**GOOD[0], "id": 9, **bad}
    files = _fixture(tmp_path, [GOOD[0], ann])
    with pytest.raises(AnnotationError, match=message):
        CocoDetection(*files, train=False, masks=True)
    with pytest.warns(UserWarning, match="dropped 1 malformed annotation"):
        ds = CocoDetection(*files, train=False, masks=True, drop_invalid=True)
    assert ds.dropped == 1 and len(ds[0][1]["boxes"]) == 1


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="annotation file not found"):
        CocoDetection(tmp_path / "none.json", tmp_path, train=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match=r"bad\.json: not valid JSON"):
        CocoDetection(tmp_path / "bad.json", tmp_path, train=False)


def test_evaluation_equals_pycocotools(tmp_path: Path) -> None:
    root = export_shapes(TINY, tmp_path / "shapes")
    ann_file = root / "annotations" / "instances_val2017.json"
    gt = json.loads(ann_file.read_text())
    rng = np.random.default_rng(0)
    outputs, ids = [], []
    for im in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes += torch.from_numpy(rng.normal(0, 1.5, boxes.shape)).float()  # imperfect detections
        masks = torch.stack([torch.from_numpy(mask_utils.decode(a["segmentation"])).float() for a in anns])[:, None]
        outputs.append({"boxes": boxes, "scores": torch.rand(len(anns)),
                        "labels": torch.tensor([a["category_id"] - 1 for a in anns]), "masks": masks})  # fmt: skip
        ids.append(im["id"])
    results = to_coco_results(outputs, ids, {k: k + 1 for k in range(4)}, masks=True)
    ours, text = coco_evaluate(ann_file, results, ("bbox", "segm"))
    assert "Average Precision" in text
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
        for iou_type in ("bbox", "segm"):
            ev = COCOeval(coco, coco.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for name, value in zip(STAT_NAMES, ev.stats, strict=True):
                assert ours[f"{iou_type}_{name}"] == pytest.approx(100 * value, abs=1e-9)
    assert ours["segm_ap"] == pytest.approx(100.0)  # the masks are the ground truth
    assert set(k for k in ours if k.startswith("bbox_ap/")) == {f"bbox_ap/{c}" for c in CLASSES}


def test_shapes_overrides_are_checked() -> None:
    assert ShapesSpec.from_overrides({"style": "hard", "train_images": 8}) == ShapesSpec(style="hard", train_images=8)
    with pytest.raises(ValueError, match=r"data.shapes.stlye: unknown setting"):
        ShapesSpec.from_overrides({"stlye": "hard"})
    with pytest.raises(ValueError, match=r"data.shapes.train_images='8': expected an integer"):
        ShapesSpec.from_overrides({"train_images": "8"})
