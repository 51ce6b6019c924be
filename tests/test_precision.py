"""Inference precisions: what runs where, bf16 parts of every task's model, int8 through PT2E, and
the accuracy each keeps on a trained digits model. (Speed: ``pvt bench --suites precision``.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pvt.layers import fused
from pvt.models import create_model
from pvt.runtime.precision import (
    Bf16Part,
    CompiledPart,
    CpuInfo,
    calibration_inputs,
    cpu_info,
    optimize_for_inference,
    resolve_precision,
)

AMD = CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f"}))
ZEN4 = CpuInfo("AMD EPYC", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))
XEON = CpuInfo("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}))


@pytest.fixture
def mkldnn_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pvt.runtime.precision._mkldnn_bf16", lambda: True)


def test_cpu_info_reads_model_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512_vnni amx_bf16 xsave\n")
    info = cpu_info.__wrapped__(str(f))
    assert info.model == "Some CPU" and info.flags == {"avx2", "avx512_vnni", "amx_bf16"}
    assert info.bf16 and info.amx and info.int8_dot
    assert "avx2 avx512_vnni amx_bf16" in info.describe()


def test_bf16_on_a_cpu_without_bf16_warns_and_runs_fp32(mkldnn_bf16: None) -> None:
    with pytest.warns(UserWarning, match=r"neither avx512_bf16 nor amx_bf16.*14x slower.*running fp32"):
        assert resolve_precision("bf16", cpu=AMD) == "fp32"
    assert resolve_precision("bf16", cpu=ZEN4) == "bf16"
    with pytest.warns(UserWarning, match="without avx512_vnni"):
        assert resolve_precision("int8", cpu=AMD) == "int8"


def test_auto_never_picks_what_the_cpu_lacks(mkldnn_bf16: None) -> None:
    assert resolve_precision("auto", cpu=AMD) == "fp32"
    assert resolve_precision("auto", cpu=ZEN4) == "bf16"  # AVX512-BF16 alone: measured faster than fp32
    assert resolve_precision("auto", cpu=XEON) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="int8 is for CPUs"):
        resolve_precision("int8", "cuda")


def test_bf16_classifier_casts_weights_once_and_answers_fp32() -> None:
    model = create_model("pvt_v2_b0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
    out_model = optimize_for_inference(copy.deepcopy(model), "bf16") if cpu_info().bf16 else None
    part = out_model if out_model is not None else Bf16Part(copy.deepcopy(model))  # emulated bf16 elsewhere
    assert isinstance(part, Bf16Part)
    assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert all(k.startswith("part.") for k in part.state_dict())  # registered once
    assert part.num_features == model.num_features  # the original's attributes
    with torch.inference_mode():
        out = part(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # The fused oneDNN path in bf16 computes what the plain bf16 ops do.
    if torch.bfloat16 in fused._DTYPES:
        previous = fused.set_enabled(False)
        try:
            with torch.inference_mode():
                plain = part(x)
        finally:
            fused.set_enabled(previous)
        assert (out - plain).abs().max() < 0.02 * ref.abs().max()


def test_bf16_detector_keeps_box_maths_in_fp32() -> None:
    from pvt.detection import mask_rcnn

    model = mask_rcnn("pvt_v2_b0", num_classes=3, min_size=128, max_size=160).eval()  # small: bf16 may be emulated
    model.roi_heads.score_thresh = 0.0  # random weights: keep every detection to compare
    images = [torch.rand(3, 96, 128)]
    with torch.inference_mode():
        ref = model(images)[0]
    from pvt.runtime.precision import _to_bf16

    half = _to_bf16(copy.deepcopy(model), compile=False)
    parts = [half.backbone, half.rpn.head, half.roi_heads.box_head, half.roi_heads.box_predictor,
             half.roi_heads.mask_head, half.roi_heads.mask_predictor]  # fmt: skip
    assert all(isinstance(p, Bf16Part) for p in parts)
    assert half.backbone.out_channels == model.backbone.out_channels
    with torch.inference_mode():
        out = half(images)[0]
    assert out["boxes"].dtype == torch.float32 and out["masks"].dtype == torch.float32
    assert len(out["boxes"]) > 0 and (out["boxes"][:, 2:] <= torch.tensor([128, 96])).all()
    # Boxes are decoded in fp32 from bf16 deltas: most of fp32's top boxes are found within 0.5 px
    # (random weights' scores are near ties, so the order may differ).
    nearest = (ref["boxes"][:10, None] - out["boxes"][None]).abs().amax(-1).amin(-1)
    assert (nearest < 0.5).float().mean() >= 0.8, nearest


def test_bf16_segmenter_labels_agree() -> None:
    from pvt.runtime.precision import _to_bf16
    from pvt.segmentation import semantic_fpn

    model = semantic_fpn("pvt_v2_b0", num_classes=4).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        ref = model(x)
        # Asked for under inference mode, as a serving loop might: the weights stay usable.
        half = optimize_for_inference(copy.deepcopy(model), "bf16") if cpu_info().bf16 else None
    half = half if half is not None else _to_bf16(copy.deepcopy(model), compile=False)
    with torch.inference_mode():
        out = half(x)
    assert isinstance(half.backbone, Bf16Part) and isinstance(half.head, Bf16Part)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_int8_is_refused_without_calibration_or_a_pvt() -> None:
    model = create_model("pvt_v2_b0", num_classes=10)
    with pytest.raises(ValueError, match="needs calibration"):
        optimize_for_inference(model, "int8")
    with pytest.raises(ValueError, match="has none"):
        optimize_for_inference(torch.nn.Sequential(torch.nn.Linear(2, 2)), "int8", calibration=[torch.randn(1, 2)])


def test_calibration_inputs_spread_and_repeat() -> None:
    data = [(torch.full((3, 4, 4), float(i)), i) for i in range(100)]
    a = calibration_inputs(data, torch.utils.data.default_collate, batches=2, batch_size=4)
    assert [t.shape for t in a] == [torch.Size([4, 3, 4, 4])] * 2
    assert [[int(v) for v in t[:, 0, 0, 0]] for t in a] == [[0, 14, 28, 42], [57, 71, 85, 99]]


def test_int8_semantic_fpn_any_size_one_calibration() -> None:
    """int8 PVT inside a dense model: calibrated through the model's own forward, exported with
    dynamic sizes, compiled per shape; the maps stay close to fp32's."""
    from pvt.segmentation import semantic_fpn

    torch.manual_seed(0)
    model = semantic_fpn("pvt_v2_b0", num_classes=4).eval()
    calib = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    q = optimize_for_inference(copy.deepcopy(model), "int8", calibration=calib)
    assert q.pvt_precision == "int8" and isinstance(q.backbone.body, CompiledPart)
    for shape in ((1, 3, 96, 64),):  # a size calibration never saw (each size compiles: ~1 min)
        x = torch.rand(*shape)
        with torch.inference_mode():
            ref, out = model(x), q(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_digits_model_keeps_its_accuracy_in_bf16_and_int8(
    digits_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's bar: a trained digits model loses at most 1 point of top-1 in bf16 and int8."""
    from pvt.cli import main

    run = tmp_path / "run"
    # 60 steps, evaluated once at the end: 96.4% top-1 (160 steps and an evaluation per epoch
    # before: twice the time for a model no more useful here).
    sets = ["train.progress=false", "schedule.iterations=60", "schedule.warmup_iters=10", "train.eval_every=100",
            "data.eval_batch_size=360"]  # fmt: skip
    args = [arg for item in sets for arg in ("--set", item)]
    assert main(["train", "classification", "--preset", "digits", "--output", str(run), *args]) == 0
    top1 = {}
    for precision in ("fp32", "bf16", "int8"):
        capsys.readouterr()
        assert main(["eval", "classification", "--checkpoint", str(run / "model.safetensors"),
                     "--set", "data.eval_batch_size=360", "--precision", precision]) == 0  # fmt: skip
        out = capsys.readouterr()
        top1[precision] = json.loads(out.out)["top1"]
        ran = "fp32" if precision == "bf16" and not cpu_info().bf16 else precision
        assert f"precision: {ran}" in out.err
    assert top1["fp32"] > 80, top1  # a trained model: the comparison means something
    assert abs(top1["bf16"] - top1["fp32"]) <= 1.0 and abs(top1["int8"] - top1["fp32"]) <= 1.0, top1


def test_bf16_made_inside_inference_mode_runs_inside_and_outside_it(
    mkldnn_bf16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model built or copied under ``torch.inference_mode()`` holds inference tensors, which
    oneDNN's bf16 kernels (and the fused path's packed-weight cache) refused at the first forward."""
    monkeypatch.setattr("pvt.runtime.precision.cpu_info", lambda: CpuInfo("test", frozenset({"avx512_bf16"})))
    model = create_model("pvt_v2_b0", num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        half = optimize_for_inference(copy.deepcopy(model), "bf16")
        inside = half(x)
    assert half.pvt_precision == "bf16" and not any(p.is_inference() for p in half.parameters())
    with torch.no_grad():
        outside = half(x)
    assert inside.shape == outside.shape == (2, 10)
    assert (inside - model(x).detach()).abs().max() < 0.1
