"""Whole Semantic FPN files of the authors' mmseg 0.13 layout: conversion, strictness and parity
with mmsegmentation's own FPN / FPNHead (reference outputs in tests/reference/mmseg/, made by
its make_reference.py from the same seeded weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pvt.checkpoint import CheckpointError
from pvt.checkpoint.io import read_checkpoint
from pvt.segmentation import semantic_fpn
from pvt.segmentation.convert import read_whole_segmenter
from pvt.segmentation.models import convert_segmenter

REF = Path(__file__).parent / "reference" / "mmseg"
sys.path.insert(0, str(REF))
from weights import make_image, make_state_dict  # noqa: E402

CLASSES = tuple(f"class{i}" for i in range(150))


@pytest.fixture(scope="module")
def mmseg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The authors' file layout: mmcv meta (with a numpy scalar, as mmcv writes) + state_dict."""
    path = tmp_path_factory.mktemp("mmseg") / "fpn_pvt_t_ade20k_40k.pth"
    meta = {"CLASSES": CLASSES, "PALETTE": [[i, i, i] for i in range(150)], "seed": np.int64(0), "iter": 40000}
    torch.save({"meta": meta, "state_dict": make_state_dict("pvt_tiny", 0)}, path)
    return path


def _logits(model: torch.nn.Module, h: int, w: int, seed: int) -> torch.Tensor:
    img = torch.from_numpy(make_image(h, w, seed=seed)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        return model(img[None])[0]


def test_matches_mmsegmentation(mmseg_file: Path) -> None:
    ref = torch.load(REF / "semantic_fpn_pvt_tiny.pt", weights_only=True)
    model = semantic_fpn("pvt_tiny", 150, checkpoint=str(mmseg_file)).eval()
    report = model.load_report
    assert not report.missing and not report.unexpected and not report.mismatched
    assert report.backbone_loaded == report.backbone_total
    assert model.class_names == list(CLASSES)
    for case in ref["cases"]:
        logits = _logits(model, *case["size"], case["image_seed"])
        diff = (logits.flatten()[case["index"]] - case["logits"]).abs().max().item()
        assert diff < 1e-4, f"{case['size']}: logits differ from mmseg's by {diff}"
        agree = (logits.argmax(0).to(torch.uint8) == case["labels"]).float().mean().item()
        assert agree >= 0.999, f"{case['size']}: {agree:.4%} of pixels get mmseg's label"


def test_converted_file_round_trips(mmseg_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "fpn_pvt_tiny.safetensors"
    ckpt, _ = convert_segmenter(str(mmseg_file), str(dst))
    _, meta = read_checkpoint(dst)
    assert meta["backbone"] == "pvt_tiny" and meta["num_classes"] == "150"
    again = read_whole_segmenter(str(dst))
    assert again.class_names == list(CLASSES) and again.embed_norm_eps == ckpt.embed_norm_eps
    a = semantic_fpn("pvt_tiny", 150, checkpoint=str(mmseg_file)).eval()
    b = semantic_fpn("pvt_tiny", 150, checkpoint=str(dst)).eval()
    torch.testing.assert_close(_logits(a, 64, 96, 0), _logits(b, 64, 96, 0), rtol=0, atol=0)


def test_refuses_what_it_cannot_place(mmseg_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"pvt_tiny with 150 classes, not on pvt_small"):
        semantic_fpn("pvt_small", 150, checkpoint=str(mmseg_file))
    with pytest.raises(CheckpointError, match=r"num_classes=150"):
        semantic_fpn("pvt_tiny", 19, checkpoint=str(mmseg_file))
    sd = make_state_dict("pvt_tiny", 0)
    bad = tmp_path / "unknown.pth"
    torch.save({**sd, "decode_head.extra_conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=r"unknown\.pth: 1 tensors of an unknown.*extra_conv"):
        semantic_fpn("pvt_tiny", 150, checkpoint=str(bad))
    aux = tmp_path / "aux.pth"
    torch.save({**sd, "auxiliary_head.conv_seg.weight": torch.zeros(150, 256, 1, 1)}, aux)
    report = semantic_fpn("pvt_tiny", 150, checkpoint=str(aux)).load_report
    assert report.ignored == ["auxiliary_head.conv_seg.weight (auxiliary head (training-only loss branch))"]
    backbone_only = tmp_path / "backbone.pth"
    torch.save({k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}, backbone_only)
    with pytest.raises(CheckpointError, match=r"backbone\.pth: not a whole Semantic FPN.*backbone_checkpoint"):
        semantic_fpn("pvt_tiny", 150, checkpoint=str(backbone_only))


def test_cli_convert_predict_and_pretrained(mmseg_file: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`pvt convert` keeps the recipe in the file; `pvt predict` needs nothing else; `--pretrained`
    finds the authors' Google-Drive file once a person has put it in the cache, and says where
    to put it before that."""
    from PIL import Image

    from pvt.cli import main

    monkeypatch.setenv("PVT_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "photo.png"
    Image.fromarray(make_image(96, 128, seed=5)).save(image)
    dst = tmp_path / "converted.safetensors"
    assert main(["convert", str(mmseg_file), str(dst)]) == 0
    assert "with its recipe" in capsys.readouterr().out
    assert main(["predict", "segmentation", "--checkpoint", str(dst), str(image)]) == 0
    from_file = capsys.readouterr().out
    shares = json.loads(from_file)["classes"]
    assert shares and set(shares) <= set(CLASSES)  # the authors' class names (from the file's meta)
    again = tmp_path / "again.safetensors"  # this project's own file converts too, with no recipe
    assert main(["convert", str(dst), str(again)]) == 0
    assert "no recipe" in capsys.readouterr().out

    assert main(["predict", "segmentation", "--pretrained", "--model", "pvt_tiny", str(image)]) == 2
    err = capsys.readouterr().err
    expected = tmp_path / "cache" / "weights" / "semantic_fpn_pvt_tiny_ade20k_official.pth"
    assert str(expected) in err and "github.com/whai362/PVT" in err
    expected.parent.mkdir(parents=True)
    expected.write_bytes(mmseg_file.read_bytes())
    assert main(["predict", "segmentation", "--pretrained", "--model", "pvt_tiny", str(image)]) == 0
    assert capsys.readouterr().out == from_file


def test_test_time_resize_is_the_authors_align_resize() -> None:
    """The evaluation resize equals the authors' AlignResize as mmcv computes it (two OpenCV
    bilinear resizes of the uint8 image; reference from reference/mmseg/make_align_resize.py)."""
    from pvt.segmentation.inference import align_resize

    ref = torch.load(REF / "align_resize.pt", weights_only=True)
    for case in ref["cases"]:
        image = torch.from_numpy(make_image(*case["size"], seed=case["image_seed"])).permute(2, 0, 1).float() / 255
        x = align_resize(image, (2048, 512))[0] * 255
        assert tuple(x.shape) == case["shape"]
        got = x.flatten()[case["index"].long()].round().to(torch.uint8)
        assert torch.equal(got, case["values"]), case["size"]
