"""The published whole models from the command line: `pvt convert` of an mmdetection file keeps its
recipe, `pvt predict` needs nothing else, and `--pretrained` resolves the `pvt weights` row (here a
Google-Drive file, which a person places in the cache) to the same detector."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmdet_reference as mref
from pvt.cli import main
from pvt.detection.coco import COCO_CATEGORY_IDS
from pvt.tasks import published_source, whole_model_task


@pytest.fixture(scope="module")
def mmdet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mmdet") / "retinanet_pvtv2_b0.pth"
    torch.save(
        {"meta": {"CLASSES": tuple(f"c{i}" for i in range(80))}, "state_dict": mref.state_dict("retinanet_pvtv2_b0")},
        path,
    )
    return path


def _lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_sources_pick_the_right_row() -> None:
    assert published_source("detection", "pvt_v2_b2", True).host == "url"  # mmdetection's zoo
    assert published_source("detection", "pvt_v2_b2", "coco", "mask_rcnn").tag == "coco-mask-rcnn-official"
    assert published_source("detection", "pvt_small", "coco-official").arch == "retinanet"
    assert published_source("segmentation", "pvt_small", "ade20k").tag == "ade20k-official"
    with pytest.raises(ValueError, match="available tags"):
        published_source("segmentation", "pvt_v2_b2", True)  # no published v2 Semantic FPN


def test_convert_predict_and_pretrained_detector(mmdet_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv("PVT_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "photo.png"
    Image.fromarray(mref.images(0)[1]).save(image)  # 384x640: mmdet's keep-ratio resize to 800x1333
    dst = tmp_path / "retina.safetensors"
    assert whole_model_task(mmdet_file) == "detection"
    assert main(["convert", str(mmdet_file), str(dst)]) == 0
    assert "with its recipe" in capsys.readouterr().out
    assert whole_model_task(dst) == "detection"

    assert main(["predict", "detection", "--checkpoint", str(dst), str(image)]) == 0
    converted = _lines(capsys.readouterr().out)
    (record,) = converted
    assert record["detections"] == 100  # mmdet's max_per_img: the file's recipe carries mmdet semantics
    assert {r["category_id"] for r in record["results"]} <= set(COCO_CATEGORY_IDS)  # type: ignore[union-attr]

    args = ["predict", "detection", "--pretrained", "coco-official", "--model", "pvt_v2_b0", str(image)]
    assert main(args) == 2
    cached = tmp_path / "cache" / "weights" / "retinanet_pvt_v2_b0_coco_official.pth"
    assert str(cached) in capsys.readouterr().err
    cached.parent.mkdir(parents=True)
    cached.write_bytes(mmdet_file.read_bytes())
    assert main(args) == 0
    assert _lines(capsys.readouterr().out) == converted
    from pvt.detection import retinanet

    model = retinanet("pvt_v2_b0", pretrained="coco-official")  # the same file from Python
    assert model.semantics == "mmdet" and model.embed_norm_eps == 1e-6  # mmdetection's own PVT
    assert model.class_names == [f"c{i}" for i in range(80)]


def test_train_pretrained_means_the_imagenet_backbone_for_dense_tasks() -> None:
    from pvt.cli import _recipe, build_parser

    args = build_parser().parse_args(["train", "detection", "--output", "x", "--pretrained", "--model", "pvt_v2_b0"])
    _, recipe = _recipe(args, "detection", None)
    assert recipe.model.backbone_pretrained is True and recipe.model.pretrained is False
    args = build_parser().parse_args(["eval", "detection", "--pretrained", "coco", "--model", "pvt_v2_b2"])
    _, recipe = _recipe(args, "detection", None)
    assert recipe.model.pretrained == "coco" and recipe.model.semantics == "mmdet"  # the papers' recipe


def test_a_semantics_other_than_the_files_warns(mmdet_file: Path) -> None:
    from pvt.detection import retinanet

    with pytest.warns(UserWarning, match=r"retinanet_pvtv2_b0\.pth: built with semantics='torchvision'.*'mmdet'"):
        model = retinanet("pvt_v2_b0", checkpoint=str(mmdet_file), semantics="torchvision")
    assert model.semantics == "torchvision"
