"""COCO input checks a user meets through ``pvt train detection``: duplicate ids, image sizes, RLE
sizes, degenerate polygons, COCO 2017's sub-pixel and slightly-outside boxes, and unsafe file names."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pvt.cli import main as cli_main
from pvt.detection.data import AnnotationError, CocoDetection
from pvt.detection.evaluate import coco_evaluate

W, H = 48, 40
TRAIN_SETS = ["data.dataset=coco", "model.num_classes=2", "data.workers=0", "data.batch_size=2",
              "data.eval_batch_size=2", "model.fpn_channels=16", "model.min_size=[48]", "model.max_size=48",
              "schedule.iterations=1", "schedule.warmup_iters=1", "train.progress=false", "train.eval_every=0",
              "data.hflip=0"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("PVT_CACHE", str(root))
    return root


def _rle(h: int, w: int) -> dict[str, Any]:
    m = np.zeros((h, w), np.uint8)
    m[5:15, 5:20] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _coco() -> dict[str, Any]:
    """Two images, three instances (polygon, polygon, RLE), two categories."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [20, 5, 12, 10], "area": 120, "iscrowd": 0,
             "segmentation": [[20, 5, 32, 5, 32, 15, 20, 15]]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 15, 10], "area": 150, "iscrowd": 0,
             "segmentation": _rle(H, W)},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }  # fmt: skip


def _write(root: Path, train: dict[str, Any], val: dict[str, Any] | None = None) -> Path:
    """A COCO layout under ``root`` (images sized from each json's width / height)."""
    for split, coco in (("train", train), ("val", val or _coco())):
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        for im in coco["images"]:
            path = root / f"{split}2017" / im["file_name"]
            if path.resolve().is_relative_to((root / f"{split}2017").resolve()):
                Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(path)
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def _train(root: Path, tmp_path: Path, preset: str = "shapes-retinanet") -> int:
    args = ["train", "detection", "--preset", preset, "--data", str(root), "--output", str(tmp_path / "run")]
    return cli_main([*args, *[x for s in TRAIN_SETS for x in ("--set", s)]])


def _refused(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str = "shapes-retinanet") -> str:
    capsys.readouterr()
    assert _train(root, tmp_path, preset) == 2
    return capsys.readouterr().err


def test_duplicate_image_ids_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = _coco()
    coco["images"][1]["id"] = 1
    err = _refused(_write(tmp_path / "data", coco), tmp_path, capsys)
    assert "instances_train2017.json" in err and "images[0] and images[1] both have id 1" in err


def test_duplicate_annotation_ids_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = _coco()
    coco["annotations"][2]["id"] = 1
    err = _refused(_write(tmp_path / "data", coco), tmp_path, capsys)
    assert "instances_train2017.json" in err and "annotations[0] and annotations[2] both have id 1" in err


@pytest.mark.parametrize("name", ["../escape.png", "sub/../../escape.png", "/tmp/abs.png", "..\\escape.png"])
def test_file_names_that_escape_the_image_folder_are_refused(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco = _coco()
    coco["images"][1]["file_name"] = name
    err = _refused(_write(tmp_path / "data", coco), tmp_path, capsys)
    assert "instances_train2017.json" in err and "image id 2" in err and "file_name" in err
    assert "inside the image folder" in err


def test_image_whose_size_differs_from_the_json_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write(tmp_path / "data", _coco())
    Image.new("RGB", (W * 2, H * 2)).save(root / "train2017" / "a.png")  # json still says 48x40
    Image.new("RGB", (W * 2, H * 2)).save(root / "train2017" / "b.png")
    err = _refused(root, tmp_path, capsys)
    assert "train2017/" in err and "is 96x80 pixels" in err and "says 48x40" in err
    assert "fix the json's width/height" in err


def test_rle_of_another_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = _coco()
    coco["annotations"][2]["segmentation"] = _rle(H + 1, W)
    err = _refused(_write(tmp_path / "data", coco), tmp_path, capsys, "shapes-mask-rcnn")
    assert "instances_train2017.json: annotation id 3 (image b.png)" in err
    assert f"RLE mask of size [{H + 1}, {W}] for a {H}x{W} image" in err


def _coco_2017_quirks() -> dict[str, Any]:
    """What COCO 2017 itself holds: degenerate polygons (one instance keeps a good one, one has
    none), a box under one pixel wide and a box a few tenths of a pixel outside the image."""
    coco = _coco()
    anns = coco["annotations"]
    anns[0]["segmentation"] = [[2, 3, 12, 3], [2, 3, 12, 3, 12, 11, 2, 11], [1, 2, 3, 4, 5]]  # 2 bad, 1 good
    anns[1]["segmentation"] = [[20, 5, 32, 5]]  # none left: kept for the box losses only
    anns += [
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [30, 10, 0.6, 9], "area": 5, "iscrowd": 0,
         "segmentation": [[30, 10, 30.6, 10, 30.6, 19, 30, 19]]},  # under one pixel wide: skipped
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [-0.3, 20, 10, 20.4], "area": 200, "iscrowd": 0,
         "segmentation": [[0, 20, 9.7, 20, 9.7, 40, 0, 40]]},  # 0.3 px left, 0.4 px below: clipped
    ]  # fmt: skip
    return coco


def test_coco_2017_quirks_train_a_mask_model(tmp_path: Path) -> None:
    """Degenerate polygons crashed training with a pycocotools TypeError, and evaluation inside
    pycocotools' own segm code; now they are dropped with one counted warning per file (the train
    and the val json each), the tiny / slightly-outside boxes are skipped / clipped, and mask AP
    is computed."""
    root = _write(tmp_path / "data", _coco_2017_quirks(), _coco_2017_quirks())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(root, tmp_path, "shapes-mask-rcnn") == 0
    for split in ("train", "val"):
        ours = [str(w.message) for w in caught if f"instances_{split}2017.json" in str(w.message)]
        assert len(ours) == 2, ours  # one per kind and file
        assert "dropped 3 polygon(s)" in ours[1] and "1 instance(s) left without a mask" in ours[1]
        assert "skipped 1 box(es) with a side under 1 pixel" in ours[0]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["iterations"] == 1 and "segm_ap" in final


def test_mask_ap_ignores_instances_without_a_valid_polygon(tmp_path: Path) -> None:
    """A val instance whose polygons are all degenerate is a crowd region for mask AP: a detection
    of it is neither a hit nor a false positive (its box still counts for box AP). Dropped instead,
    the top-scoring detection below would be a false positive and mask AP about 64, not 100."""
    coco = _coco()
    coco["annotations"][1].update(category_id=1, segmentation=[[20, 5, 32, 5], [1, 2, 3]])  # none valid
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(coco))

    def result(image_id: int, bbox: list[float], score: float) -> dict[str, Any]:
        x, y, w, h = bbox
        rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], H, W))
        return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}  # fmt: skip

    # Exact hits on the three cats; the maskless one (id 2) scores highest.
    dets = [result(1, [2, 3, 10, 8], 0.8), result(2, [20, 5, 12, 10], 0.95), result(2, [5, 5, 15, 10], 0.7)]
    metrics, text = coco_evaluate(ann, dets, ("bbox", "segm"))
    assert "1 instance(s) without a valid polygon are ignored for mask AP" in text
    assert metrics["bbox_ap/cat"] == pytest.approx(100.0)
    assert metrics["segm_ap/cat"] == pytest.approx(100.0)
    assert json.loads(ann.read_text()) == coco  # the file is read, never rewritten


def _dataset(tmp_path: Path, coco: dict[str, Any], **kw: Any) -> CocoDetection:
    root = _write(tmp_path / "data", coco)
    return CocoDetection(root / "annotations" / "instances_train2017.json", root / "train2017", train=False, **kw)


def test_targets_of_the_quirks(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"dropped 3 polygon\(s\)"):
        ds = _dataset(tmp_path, _coco_2017_quirks(), masks=True, label_offset=1)
    _, a = ds[0]
    assert a["boxes"].flatten().tolist() == pytest.approx([2, 3, 12, 11, 0, 20, 9.7, 40])  # id 4 skipped, 5 clipped
    assert a["mask_valid"].tolist() == [True, True] and a["masks"][0, 5, 5] == 1
    _, b = ds[1]
    assert b["labels"].tolist() == [2, 1] and b["mask_valid"].tolist() == [False, True]
    assert b["masks"][0].sum() == 0 and b["masks"][1].sum() == 150  # the maskless one: all zero


def test_mask_valid_follows_its_instance_through_flip_and_crop(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        root = _write(tmp_path / "data", _coco_2017_quirks())
        ds = CocoDetection(root / "annotations" / "instances_train2017.json", root / "train2017", train=True,
                           masks=True, hflip=0.5, crop=1.0, crop_resize=(40,), crop_size=(16, 24))  # fmt: skip
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        _, t = ds[1]
        assert len(t["mask_valid"]) == len(t["labels"]) == len(t["boxes"]) == len(t["masks"])
        for label, valid in zip(t["labels"].tolist(), t["mask_valid"].tolist(), strict=True):
            assert valid == (label == 0)  # image b: the dog (label 1 here) has no mask, the cat (0) has one
        seen.add(len(t["labels"]))
    assert len(seen) > 1  # crops removed instances, and the flags went with them


@pytest.mark.parametrize(
    ("bbox", "message"),
    [
        ([44, 3, 6, 8], r"box \[44, 3, 6, 8\] more than 1 pixel outside the 48x40 image"),
        ([2, -1.5, 6, 8], "more than 1 pixel outside"),
        ([2, 3, -4, 8], "negative size"),
    ],
)
def test_boxes_grossly_outside_or_negative_are_refused(tmp_path: Path, bbox: list[float], message: str) -> None:
    coco = _coco()
    coco["annotations"][0]["bbox"] = bbox
    with pytest.raises(AnnotationError, match=message):
        _dataset(tmp_path, coco)


def test_boxes_within_a_pixel_are_clipped_and_zero_area_ones_skipped(tmp_path: Path) -> None:
    coco = _coco()
    coco["annotations"][0]["bbox"] = [47.5, 3, 1.4, 8]  # 0.9 px outside: clipped to 0.5 px wide
    coco["annotations"].append(copy.deepcopy(coco["annotations"][0]) | {"id": 9, "bbox": [48, 3, 1, 8]})
    with pytest.warns(UserWarning, match=r"skipped 1 box\(es\) with no area inside the image"):
        ds = _dataset(tmp_path, coco)
    assert ds[0][1]["boxes"].tolist() == [[47.5, 3.0, 48.0, 11.0]]


def test_a_class_count_other_than_the_datas_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Evaluation maps every label to a category id: more classes than categories crashed it."""
    root = _write(tmp_path / "data", _coco())
    capsys.readouterr()
    args = ["train", "detection", "--preset", "shapes-retinanet", "--data", str(root), "--output", str(tmp_path / "r")]
    sets = [*TRAIN_SETS, "model.num_classes=3"]  # the later value wins
    assert cli_main([*args, *[x for s in sets for x in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "instances_val2017.json: 2 categories, but model.num_classes=3; set --set model.num_classes=2" in err
