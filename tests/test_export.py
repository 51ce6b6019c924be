"""Export and deploy: ONNX (ONNX Runtime, CPU, fp32) and torch.export files against PyTorch.

Classifiers and backbones: one dynamic export per model, checked at two input sizes (and two
batch sizes). Detectors and the Semantic FPN: trained a few steps on the embedded shapes presets,
exported with dynamic height and width by ``pvt export``, then compared detection by detection and
pixel by pixel, through the library and through ``pvt predict / eval --runtime onnxruntime``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pvt
from pvt.cli import build_parser
from pvt.cli import main as cli_main
from pvt.cli.deploy import build_for_export
from pvt.deploy import ExportError, export, min_dynamic_side, read_metadata
from pvt.deploy.onnx_runtime import load_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

torch.set_flush_denormal(True)  # random weights: keeps denormal-heavy activations fast

TINY_SHAPES = "data.shapes={image_size: 64, train_images: 8, val_images: 4, min_size: 12, max_size: 40}"
DETECTION_SETS = [TINY_SHAPES, "model.fpn_channels=32", "model.min_size=[64]", "model.max_size=64",
                  "schedule.iterations=3", "schedule.warmup_iters=1", "data.batch_size=4", "train.progress=false",
                  "train.log_every=1"]  # fmt: skip
SEGMENTATION_SETS = [TINY_SHAPES, "model.fpn_channels=32", "model.head_channels=32", "data.scale=[128,64]",
                     "data.crop_size=[64,64]", "data.eval_scale=[128,64]", "schedule.iterations=3",
                     "schedule.warmup_iters=1", "data.batch_size=4", "train.progress=false",
                     "train.log_every=1"]  # fmt: skip
# Every detection is scored (no threshold), so that the comparison covers 100 detections per image.
NO_THRESHOLD = "model.score_thresh=0.0"


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict[str, Path]:
    """A shapes RetinaNet, Mask R-CNN and Semantic FPN, each trained for 3 steps (their weights have
    left the init: the box heads and norms were updated)."""
    out = {}
    base = tmp_path_factory.mktemp("runs")
    for name, task, preset, sets in [
        ("retinanet", "detection", "shapes-retinanet", DETECTION_SETS),
        ("mask_rcnn", "detection", "shapes-mask-rcnn", DETECTION_SETS),
        ("semantic_fpn", "segmentation", "shapes-semantic-fpn", SEGMENTATION_SETS),
    ]:
        run = base / name
        assert cli_main(["train", task, "--preset", preset, "--output", str(run), *_sets(sets)]) == 0
        out[name] = run / "model.safetensors"
    return out


def _images(cache: Path) -> list[torch.Tensor]:
    """Two validation scenes at two sizes: 64x64 and 72x96 (a resized copy, another aspect ratio)."""
    paths = sorted(cache.rglob("val2017/*.png"))[:2]
    first = Image.open(paths[0]).convert("RGB")
    second = Image.open(paths[1]).convert("RGB").resize((96, 72), Image.Resampling.BILINEAR)
    return [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 for im in (first, second)]


def _export_cli(source: Path | str, out: Path, *args: str) -> dict[str, Any]:
    assert cli_main(["export", str(source), "--out", str(out), *args]) == 0
    return read_metadata(out)


def _build(source: Path | str, *args: str) -> torch.nn.Module:
    """The PyTorch model ``pvt export`` builds for the same arguments."""
    ns = build_parser().parse_args(["export", str(source), "--out", "unused.onnx", *args])
    return build_for_export(ns)[0]


# -- classifiers and backbones ------------------------------------------------------------------


def _check_dense(model: torch.nn.Module, path: Path, sizes: list[tuple[int, int, int]], tol: float) -> float:
    """Max |diff| of the ONNX Runtime outputs against PyTorch over inputs of ``sizes`` (B, H, W)."""
    runtime = load_onnx(path)
    worst = 0.0
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref, got = model(x), runtime(x)
        refs = ref if isinstance(ref, list) else [ref]
        gots = got if isinstance(got, list) else [got]
        assert [tuple(t.shape) for t in gots] == [tuple(t.shape) for t in refs]
        for r, g in zip(refs, gots, strict=True):
            diff = (r - g).abs().max().item()
            assert diff < tol, (path.name, (b, h, w), diff)
            worst = max(worst, diff)
    return worst


SMALLEST = ["pvt_tiny", "pvt_v2_b0"]


@pytest.mark.parametrize("name", SMALLEST)
@pytest.mark.parametrize("features_only", [False, True])
def test_dynamic_onnx_matches_pytorch_at_two_sizes(name: str, features_only: bool, tmp_path: Path) -> None:
    # One block per stage: every kind of layer is there, and the export takes half the time.
    model = pvt.create_model(name, num_classes=10, features_only=features_only, depths=(1, 1, 1, 1)).eval()
    path = export(model, torch.randn(1, 3, 96, 128), tmp_path / "m.onnx", dynamic=True)
    # Another batch and sizes that are no multiple of 32 (v1 resizes its position tables to them).
    _check_dense(model, path, [(1, 96, 128), (3, 77, 141)], tol=1e-4)
    meta = read_metadata(path)
    assert meta["dynamic"]["batch"] is True and meta["dynamic"]["min_side"] == min_dynamic_side(model)


def test_linear_sra_pooling_is_dynamic(tmp_path: Path) -> None:
    """b2-li pools keys and values to 7x7 whatever the size: the export must not fix the pooling
    windows to the example's (one block per stage, so that the export is quick)."""
    model = pvt.create_model("pvt_v2_b2_li", num_classes=10, depths=(1, 1, 1, 1)).eval()
    path = export(model, torch.randn(1, 3, 64, 64), tmp_path / "li.onnx", dynamic=True)
    _check_dense(model, path, [(1, 64, 64), (2, 100, 75)], tol=1e-4)


def test_static_export_fixes_the_shape_and_says_so(tmp_path: Path) -> None:
    model = pvt.create_model("pvt_v2_b0", num_classes=10).eval()
    path = export(model, torch.randn(1, 3, 64, 64), tmp_path / "static.onnx")
    runtime = load_onnx(path)
    _check_dense(model, path, [(1, 64, 64), (3, 64, 64)], tol=1e-4)  # batch 1 files run image by image
    with pytest.raises(ExportError, match=r"static.onnx: exported with a fixed input shape .*--dynamic"):
        runtime(torch.randn(1, 3, 96, 64))


def test_pt2_reproduces_pytorch(tmp_path: Path) -> None:
    model = pvt.create_model("pvt_v2_b0", num_classes=10, depths=(1, 1, 1, 1)).eval()  # one block a stage: quick
    path = pvt.export(model, torch.randn(2, 3, 96, 96), tmp_path / "m.pt2", format="pt2", dynamic=True)
    program = torch.export.load(path).module()
    for shape in [(1, 3, 96, 96), (2, 3, 70, 130)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max().item() < 1e-5
    assert read_metadata(path)["task"] == "classification"


def test_small_dynamic_example_is_refused_with_the_minimum(tmp_path: Path) -> None:
    model = pvt.create_model("pvt_v2_b0", num_classes=10).eval()
    low = min_dynamic_side(model)
    with pytest.raises(ExportError, match=rf"below the {low} px a dynamic export .* has size 1"):
        export(model, torch.randn(1, 3, 32, 96), tmp_path / "x.onnx", dynamic=True)
    assert not (tmp_path / "x.onnx").exists()


ALL_VARIANTS = [n for n in pvt.list_models() if n not in SMALLEST]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PVT_EXPORT_SWEEP"), reason="set PVT_EXPORT_SWEEP=1: 15-25 min on 2 cores")
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_every_variant_exports_dynamic(name: str, tmp_path: Path) -> None:
    for features_only in (False, True):
        model = pvt.create_model(name, num_classes=10, features_only=features_only).eval()
        path = export(model, torch.randn(1, 3, 64, 96), tmp_path / f"{name}.onnx", dynamic=True)
        _check_dense(model, path, [(1, 64, 96), (2, 96, 72)], tol=1e-4)
    pt2 = export(model, torch.randn(2, 3, 64, 96), tmp_path / f"{name}.pt2", format="pt2", dynamic=True)
    program = torch.export.load(pt2).module()
    x = torch.randn(2, 3, 96, 72)
    with torch.no_grad():
        assert max((a - b).abs().max().item() for a, b in zip(program(x), model(x), strict=True)) < 1e-5


# -- detectors and the Semantic FPN, trained on the shapes scenes --------------------------------


def _match(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    """Every PyTorch detection has its own ONNX Runtime twin: same label, box within 0.01 px, score
    within 1e-4 (and for Mask R-CNN, mask probabilities within 1e-3). Returns the largest box diff."""
    n = len(ref["boxes"])
    assert n == len(got["boxes"]) > 0
    free = torch.ones(n, dtype=torch.bool)
    worst = 0.0
    for i in range(n):
        box_diff = (got["boxes"] - ref["boxes"][i]).abs().amax(dim=1)
        ok = free & (got["labels"] == ref["labels"][i]) & (box_diff < 0.01)
        ok &= (got["scores"] - ref["scores"][i]).abs() < 1e-4
        assert ok.any(), f"detection {i} of PyTorch has no twin: {ref['boxes'][i]} {ref['scores'][i]}"
        j = int(torch.nonzero(ok)[0])
        free[j] = False
        worst = max(worst, box_diff[j].item())
        if "masks" in ref:
            assert (got["masks"][j] - ref["masks"][i]).abs().max().item() < 1e-3
    return worst


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_detector_onnx_gives_the_same_detections(
    detector: str, runs: dict[str, Path], cache: Path, tmp_path: Path
) -> None:
    args = ["--task", "detection", "--set", NO_THRESHOLD]
    path = tmp_path / f"{detector}.onnx"
    meta = _export_cli(runs[detector], path, *args, "--dynamic", "--size", "64", "64")
    assert meta["input"]["layout"].startswith("CHW") and "0..1" in meta["input"]["range"]
    assert meta["classes"] == ["circle", "square", "triangle", "star"]
    assert meta["label_offset"] == 0 and "label_offset" not in meta["artifacts"]  # labels index classes
    model = _build(runs[detector], *args)
    runtime = load_onnx(path)
    for image in _images(cache):  # 64x64 and 72x96
        with torch.no_grad():
            ref, got = model([image])[0], runtime([image])[0]
        assert set(got) == set(ref)
        _match(ref, got)


def _predict_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert cli_main(["predict", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def _same_coco_results(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    assert len(ref) == len(got) > 0
    free = list(got)
    for r in ref:
        twins = [g for g in free if g["category_id"] == r["category_id"] and abs(g["score"] - r["score"]) < 1e-4
                 and max(abs(a - b) for a, b in zip(g["bbox"], r["bbox"], strict=True)) < 0.01]  # fmt: skip
        assert twins, r
        free.remove(twins[0])
        if "segmentation" in r:
            from pycocotools import mask as mask_utils

            a, b = mask_utils.decode(r["segmentation"]), mask_utils.decode(twins[0]["segmentation"])
            assert (a == b).mean() >= 0.999


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_predict_and_eval_with_onnxruntime_match_pytorch(
    detector: str, runs: dict[str, Path], cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "det.onnx"
    _export_cli(runs[detector], path, "--task", "detection", "--dynamic", "--set", NO_THRESHOLD)
    images = [str(p) for p in sorted(cache.rglob("val2017/*.png"))[:2]]
    ref = _predict_json(["detection", "--checkpoint", str(runs[detector]), "--set", NO_THRESHOLD, *images], capsys)
    got = _predict_json(["detection", "--runtime", "onnxruntime", "--model", str(path), *images], capsys)
    assert [r["image"] for r in got] == images
    for r, g in zip(ref, got, strict=True):
        _same_coco_results(r["results"], g["results"])

    evaluate = ["eval", "detection", "--preset", f"shapes-{detector.replace('_', '-')}", *_sets(DETECTION_SETS)]
    capsys.readouterr()
    assert cli_main([*evaluate, "--checkpoint", str(runs[detector]), "--set", NO_THRESHOLD]) == 0
    ref_metrics = json.loads(capsys.readouterr().out)
    assert cli_main([*evaluate, "--runtime", "onnxruntime", "--model", str(path)]) == 0
    got_metrics = json.loads(capsys.readouterr().out)
    keys = ["bbox_ap", "bbox_ap50"] + (["segm_ap"] if detector == "mask_rcnn" else [])
    for k in keys:
        assert got_metrics[k] == pytest.approx(ref_metrics[k], abs=1e-3), k


def test_semantic_fpn_gives_the_same_label_maps(
    runs: dict[str, Path], cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pvt.segmentation.inference import infer

    path = tmp_path / "fpn.onnx"
    meta = _export_cli(runs["semantic_fpn"], path, "--task", "segmentation", "--dynamic", "--size", "64", "64")
    assert meta["classes"] == ["background", "circle", "square", "triangle", "star"]
    assert meta["preprocess"]["eval_scale"] == [128, 64]
    model = _build(runs["semantic_fpn"], "--task", "segmentation")
    runtime = load_onnx(path)
    for image in _images(cache):  # the model sees 64x64 and 64x96 (eval_scale 128x64, aligned to 32)
        with torch.no_grad():
            ref = infer(model, image, scale=(128, 64))
            got = infer(runtime, image, scale=(128, 64))
        assert (ref - got).abs().max().item() < 1e-4
        assert (ref.argmax(0) == got.argmax(0)).float().mean().item() >= 0.999

    images = [str(p) for p in sorted(cache.rglob("val2017/*.png"))[:2]]
    ref_json = _predict_json(["segmentation", "--checkpoint", str(runs["semantic_fpn"]), *images], capsys)
    got_json = _predict_json(["segmentation", "--runtime", "onnxruntime", "--model", str(path), *images], capsys)
    assert got_json == ref_json

    evaluate = ["eval", "segmentation", "--preset", "shapes-semantic-fpn", *_sets(SEGMENTATION_SETS)]
    assert cli_main([*evaluate, "--checkpoint", str(runs["semantic_fpn"])]) == 0
    ref_metrics = json.loads(capsys.readouterr().out)
    assert cli_main([*evaluate, "--runtime", "onnxruntime", "--model", str(path)]) == 0
    got_metrics = json.loads(capsys.readouterr().out)
    assert got_metrics["mIoU"] == pytest.approx(ref_metrics["mIoU"], abs=1e-3) and "iou/star" in got_metrics


def test_classifier_predict_with_onnxruntime_matches_pytorch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder (weights, config.yaml, task.json): the exported file brings the run's
    evaluation transform and class names, so pvt predict prints the same JSON."""
    from pvt.engine import load_recipe
    from pvt.tasks import get_task

    run = tmp_path / "run"
    run.mkdir()
    task = get_task("classification")
    sets = ["model.name=pvt_v2_b0", "model.num_classes=3", "data.input_size=64", "data.crop_pct=0.9",
            "data.interpolation=bilinear"]  # fmt: skip
    recipe = load_recipe("classification", task.data_config, {}, sets, model_cls=task.model_config)
    recipe.dump(run / "config.yaml")
    model = pvt.create_model("pvt_v2_b0", num_classes=3)
    pvt.save_safetensors(model.state_dict(), run / "model.safetensors", arch="pvt_v2_b0")
    (run / "task.json").write_text(json.dumps({"classes": ["ant", "bee", "cat"]}))
    images = []
    for i, size in enumerate([(80, 60), (50, 90)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray((np.random.default_rng(i).random((*size, 3)) * 255).astype(np.uint8)).save(path)
        images.append(str(path))

    path = tmp_path / "c.onnx"
    meta = _export_cli(run / "model.safetensors", path, "--dynamic", "--no-check")
    assert meta["preprocess"]["center_crop"] == 64 and meta["preprocess"]["interpolation"] == "bilinear"
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["size"] == [64, 64]
    ref = _predict_json(["classification", "--checkpoint", str(run / "model.safetensors"), *images], capsys)
    got = _predict_json(["classification", "--runtime", "onnxruntime", "--model", str(path), *images], capsys)
    assert [r["image"] for r in got] == images
    for r, g in zip(ref, got, strict=True):
        assert [t["label"] for t in g["top5"]] == [t["label"] for t in r["top5"]]
        assert [t["prob"] for t in g["top5"]] == pytest.approx([t["prob"] for t in r["top5"]], abs=2e-5)


# -- metadata and refusals ----------------------------------------------------------------------


def test_classifier_metadata_states_the_preprocessing(tmp_path: Path) -> None:
    path = tmp_path / "c.onnx"
    meta = _export_cli("pvt_v2_b0", path, "--size", "64", "64", "--no-check")
    assert meta["task"] == "classification" and meta["arch"] == "pvt_v2_b0"
    assert meta["input"]["name"] == "image" and meta["input"]["layout"] == "NCHW"
    assert meta["input"]["mean"] == [0.485, 0.456, 0.406] and "normalised" in meta["input"]["range"]
    assert meta["preprocess"]["resize_short_side"] == 256 and meta["preprocess"]["center_crop"] == 224
    assert meta["dynamic"] == {"batch": 1, "height": False, "width": False}
    import onnxruntime as ort

    custom = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map  # what any consumer sees
    assert json.loads(custom["pvt.input"])["name"] == "image"


def test_bad_files_and_impossible_exports_are_refused(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.onnx"
    _export_cli("pvt_v2_b0", good, "--size", "64", "64", "--no-check")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    capsys.readouterr()
    assert cli_main(["predict", "classification", "--runtime", "onnxruntime", "--model", str(cut), str(good)]) == 2
    err = capsys.readouterr().err
    assert "cut.onnx: not a readable ONNX model" in err and "re-export it with pvt export" in err

    import onnx

    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(good))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    with pytest.raises(ExportError, match=r"bare\.onnx: an ONNX model without pvt-vision metadata"):
        load_onnx(bare)
    with pytest.raises(ExportError, match=r"good\.onnx: holds a classification model"):
        load_onnx(good, task="detection")

    detector = _build(runs["retinanet"], "--task", "detection")
    with pytest.raises(ExportError, match=r"cannot be exported to pt2: torch\.export cannot trace"):
        export(detector, torch.rand(3, 64, 64), tmp_path / "d.pt2", format="pt2")
    detector.semantics = "mmdet"
    with pytest.raises(ExportError, match="semantics='mmdet' cannot be exported faithfully"):
        export(detector, torch.rand(3, 64, 64), tmp_path / "d.onnx")
    args = ["export", str(runs["retinanet"]), "--task", "detection", "--batch", "2", "--out", str(tmp_path / "b.onnx")]
    assert cli_main(args) == 2
    assert "takes one image per run" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "d.onnx").exists()
