"""Checkpoint layouts, strict loading with its allowed exceptions, and clear errors."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import pvt
from conftest import perturb_
from pvt.checkpoint import CheckpointError, detect_layout, infer_arch, load_checkpoint
from pvt.cli import main as cli_main

StateDict = dict[str, Tensor]


def _outputs(model: torch.nn.Module, size: tuple[int, int] = (64, 64)) -> Tensor | list[Tensor]:
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_same(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def to_mmdet(sd: StateDict) -> StateDict:
    """Official -> mmdetection's PVT layout, as mmdet's ``pvt_convert`` writes it (dense backbone)."""
    pos = any(k.startswith("pos_embed") for k in sd)
    conv_ffn = any("dwconv" in k for k in sd)
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith(("head", "norm.", "cls_token")):
            continue
        if m := re.match(r"^pos_embed(\d)$", k):
            i = int(m.group(1))
            out[f"layers.{i - 1}.1.0.pos_embed"] = v[:, 1:] if v.shape[1] == 50 else v
        elif m := re.match(r"^patch_embed(\d)\.(.*)$", k):
            out[f"layers.{int(m.group(1)) - 1}.0.{m.group(2).replace('proj.', 'projection.')}"] = v
        elif m := re.match(r"^norm(\d)\.(.*)$", k):
            out[f"layers.{int(m.group(1)) - 1}.2.{m.group(2)}"] = v
        elif m := re.match(r"^block(\d)\.(\d+)\.(.*)$", k):
            base = f"layers.{int(m.group(1)) - 1}.1.{int(m.group(2)) + pos}."
            tail = m.group(3)
            if tail.startswith("attn.q."):
                kind = tail.split(".")[-1]
                out[base + f"attn.attn.in_proj_{kind}"] = torch.cat([v, sd[k.replace("attn.q.", "attn.kv.")]])
            elif tail.startswith("attn.kv."):
                continue
            elif tail.startswith("attn.proj."):
                out[base + tail.replace("attn.proj.", "attn.attn.out_proj.")] = v
            elif tail.startswith("mlp."):
                if tail.endswith("weight") and ("fc1" in tail or "fc2" in tail):
                    v = v.reshape(*v.shape, 1, 1)
                tail = tail.replace("mlp.", "ffn.layers.").replace("fc1.", "0.")
                tail = tail.replace("dwconv.dwconv.", "1.").replace("fc2.", "4." if conv_ffn else "3.")
                out[base + tail] = v
            else:
                out[base + tail] = v
    return out


@pytest.fixture(scope="module")
def v1_cls() -> pvt.PyramidBackbone:
    torch.manual_seed(0)
    return perturb_(pvt.create_model("pvt_tiny")).eval()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def v2_cls() -> pvt.PyramidBackbone:
    torch.manual_seed(0)
    return perturb_(pvt.create_model("pvt_v2_b0")).eval()  # type: ignore[return-value]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "meta": {"epoch": 3}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["flat", "model", "state_dict", "ddp"],
)
@pytest.mark.parametrize("arch", ["v1", "v2"])
def test_official_layouts_load_exactly(
    wrap, arch: str, tmp_path: Path, v1_cls: pvt.PyramidBackbone, v2_cls: pvt.PyramidBackbone
) -> None:
    src = v1_cls if arch == "v1" else v2_cls
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(src.state_dict()), path)
    model = pvt.create_model(src.arch, checkpoint=path)  # type: ignore[arg-type]
    report = model.load_report
    assert isinstance(report, pvt.LoadReport)
    assert report.layout == "official" and report.arch == src.arch
    assert not (report.missing or report.unexpected or report.dropped or report.reshaped)
    _assert_same(_outputs(model), _outputs(src))


@pytest.mark.parametrize("arch", ["pvt_tiny", "pvt_v2_b0"])
def test_detector_checkpoint_backbone_prefix(arch: str, tmp_path: Path) -> None:
    src = perturb_(pvt.create_model(arch, features_only=True))
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    sd["bbox_head.retina_cls.weight"] = torch.zeros(720, 256, 3, 3)
    path = tmp_path / "retinanet.pth"
    torch.save({"meta": {"mmdet_version": "2.13.0"}, "state_dict": sd}, path)
    model = pvt.create_model(arch, features_only=True, checkpoint=path)
    assert model.load_report.ignored == ["bbox_head.retina_cls.weight", "neck.lateral_convs.0.conv.weight"]
    _assert_same(_outputs(model), _outputs(src))


@pytest.mark.parametrize("arch", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b1"])
def test_mmdet_converted_layout(arch: str) -> None:
    src = perturb_(pvt.create_model(arch, features_only=True))
    mm = {f"backbone.{k}": v for k, v in to_mmdet(src.state_dict()).items()}
    assert detect_layout({k[9:]: v for k, v in mm.items()}) == "mmdet"
    model = pvt.create_model(arch, features_only=True, checkpoint=mm)
    assert model.load_report.layout == "mmdet"
    # The cls slot of pos_embed4 is unused by a dense model; everything else is exact.
    _assert_same(_outputs(model), _outputs(src))


def test_own_safetensors_roundtrip(tmp_path: Path, v2_cls: pvt.PyramidBackbone) -> None:
    path = tmp_path / "b0.safetensors"
    pvt.save_safetensors(v2_cls.state_dict(), path, arch="pvt_v2_b0")
    model = pvt.create_model("pvt_v2_b0", checkpoint=path)
    assert model.load_report.layout == "pvt-vision"
    _assert_same(_outputs(model), _outputs(v2_cls))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_pos_embed_resized_from_another_resolution(v1_cls: pvt.PyramidBackbone) -> None:
    src = perturb_(pvt.create_model("pvt_tiny", img_size=384))
    assert tuple(src.pos_embed1.shape) == (1, 96 * 96, 64)
    model = pvt.create_model("pvt_tiny", checkpoint=src.state_dict())
    r = model.load_report.reshaped
    assert r["pos_embed1"] == ((1, 9216, 64), (1, 3136, 64))
    assert r["pos_embed4"] == ((1, 145, 512), (1, 50, 512))
    torch.testing.assert_close(model.pos_embed4[:, :1], src.pos_embed4[:, :1])  # cls slot kept
    grid = src.pos_embed1.reshape(1, 96, 96, 64).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(56, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.pos_embed1, want.flatten(2).transpose(1, 2))
    # Built at the checkpoint's resolution instead, nothing is resized.
    same = pvt.create_model("pvt_tiny", img_size=384, checkpoint=src.state_dict())
    assert not same.load_report.reshaped


def test_head_of_other_class_count_is_dropped(v2_cls: pvt.PyramidBackbone) -> None:
    model = pvt.create_model("pvt_v2_b0", num_classes=10, checkpoint=v2_cls.state_dict())
    report = model.load_report
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert report.kept_init == ["head.weight", "head.bias"]
    assert "other class count" in report.dropped["head.weight"]
    _assert_same(model.patch_embed1.proj.weight, v2_cls.patch_embed1.proj.weight)


def test_features_only_v1_drops_classifier_tensors(v1_cls: pvt.PyramidBackbone) -> None:
    model = pvt.create_model("pvt_tiny", features_only=True, checkpoint=v1_cls.state_dict()).eval()
    assert set(model.load_report.dropped) == {
        "cls_token",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        feats = model(x)
        ref = v1_cls.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    _assert_same(feats[:3], ref)


def test_unbuilt_stages_are_dropped(v2_cls: pvt.PyramidBackbone) -> None:
    model = pvt.create_model("pvt_v2_b0", features_only=True, out_indices=(0, 1), checkpoint=v2_cls.state_dict())
    model.eval()  # as the reference: the same (fused) inference path, so equal to the bit
    dropped = model.load_report.dropped
    assert "block3.0.attn.q.weight" in dropped and "norm4.weight" in dropped
    assert "stage 3 is not built" in dropped["patch_embed3.proj.weight"]
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        ref = v2_cls.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        _assert_same(model(x), ref)


def test_backbone_checkpoint_into_classifier() -> None:
    dense = perturb_(pvt.create_model("pvt_v2_b0", features_only=True))
    model = pvt.create_model("pvt_v2_b0", num_classes=5, checkpoint=dense.state_dict())
    assert model.load_report.kept_init == ["head.weight", "head.bias"]
    # v1 needs its cls token and final norm for classification: strict refuses, non-strict reports.
    dense_v1 = pvt.create_model("pvt_tiny", features_only=True).state_dict()
    with pytest.raises(CheckpointError, match="missing"):
        pvt.create_model("pvt_tiny", checkpoint=dense_v1)
    model = pvt.create_model("pvt_tiny", checkpoint=dense_v1, strict=False)
    assert model.load_report.missing == ["cls_token", "norm.weight", "norm.bias"]


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_checkpoint(pvt.create_model("pvt_v2_b0"), {"conv1.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(pvt.create_model("pvt_v2_b0"), {"epoch": 3})


def test_mismatched_architecture_names_both(v2_cls: pvt.PyramidBackbone) -> None:
    b1 = pvt.create_model("pvt_v2_b1").state_dict()
    with pytest.raises(CheckpointError, match=r"looks like pvt_v2_b1 but the model is pvt_v2_b2"):
        pvt.create_model("pvt_v2_b2", checkpoint=b1)
    # Below 90% of the backbone, even strict=False refuses (never a silent partial load).
    with pytest.raises(CheckpointError, match="Refusing to load under 90%"):
        pvt.create_model("pvt_v2_b2", checkpoint=v2_cls.state_dict(), strict=False)


def test_small_mismatch_strict_vs_non_strict(v2_cls: pvt.PyramidBackbone) -> None:
    sd = dict(v2_cls.state_dict())
    del sd["block1.0.mlp.fc2.bias"]
    sd["block9.0.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing .*block1\.0\.mlp\.fc2\.bias.*1 unexpected"):
        pvt.create_model("pvt_v2_b0", checkpoint=sd)
    model = pvt.create_model("pvt_v2_b0", checkpoint=sd, strict=False)
    assert model.load_report.missing == ["block1.0.mlp.fc2.bias"]
    assert model.load_report.unexpected == ["block9.0.extra"]
    assert "missing: 1" in str(model.load_report)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    model = pvt.create_model("pvt_v2_b0")
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=re.escape(f"{missing}: checkpoint file not found")):
        load_checkpoint(model, missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(str(garbage)) + ".*weights_only=True"):
        load_checkpoint(model, garbage)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(bad_st)) + ".*safetensors"):
        load_checkpoint(model, bad_st)


class Pickled:
    """Arbitrary Python object: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.pth"
    torch.save({"model": pvt.create_model("pvt_v2_b0").state_dict(), "args": Pickled()}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*re-save just its state dict"):
        pvt.create_model("pvt_v2_b0", checkpoint=path)


def test_infer_arch_for_every_model() -> None:
    for name in pvt.list_models():
        with torch.device("meta"):
            sd = pvt.create_model(name).state_dict()
        assert infer_arch(sd) == name


def test_cli_convert_and_reload(tmp_path: Path, v1_cls: pvt.PyramidBackbone, capsys) -> None:
    src = tmp_path / "official.pth"
    torch.save({"model": v1_cls.state_dict()}, src)
    dst = tmp_path / "out" / "tiny.safetensors"
    assert cli_main(["convert", str(src), str(dst)]) == 0
    assert "pvt_tiny" in capsys.readouterr().out
    model = pvt.create_model("pvt_tiny", checkpoint=dst)
    assert model.load_report.layout == "pvt-vision"
    _assert_same(_outputs(model), _outputs(v1_cls))
    # An mmdet dense checkpoint converts too (arch inferred, cls slot restored).
    mm = tmp_path / "mm.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in to_mmdet(v1_cls.state_dict()).items()}}, mm)
    assert cli_main(["convert", str(mm), str(tmp_path / "mm.safetensors")]) == 0
    assert cli_main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def test_cli_models_and_flops(capsys) -> None:
    assert cli_main(["models", "pvt_v2_b0"]) == 0
    assert "| `pvt_v2_b0` | 3.667 | 3.7 | 0.571 | 0.6 | 70.5 |" in capsys.readouterr().out
    assert cli_main(["flops", "pvt_small", "--size", "800", "1280", "--features-only"]) == 0
    assert "3x800x1280" in capsys.readouterr().out
    assert cli_main(["flops", "pvt_v2_b0", "--size", "16", "16"]) == 2
    assert "at least 29 pixels" in capsys.readouterr().err


class _MMHistory:
    """Stands for an mmengine object in a checkpoint's meta (pickled under mmengine's name)."""

    def __init__(self) -> None:
        self.values = [1.0, 2.0]


_MMHistory.__module__ = "mmengine.logging.history_buffer"


class _Runs:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("executed",))


_Runs.__module__ = "mmengine.evil"


def test_openmmlab_meta_is_read_without_running_it(tmp_path: Path, capsys, monkeypatch) -> None:
    """mmcv / mmengine meta (numpy scalars, mmengine objects) is read as inert stand-ins; the
    tensors load; anything outside those packages is still refused."""
    for name in ("mmengine", "mmengine.logging"):  # importable while pickling only (not installed)
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for cls in (_MMHistory, _Runs):
        module = types.ModuleType(cls.__module__)
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, cls.__module__, module)
    sd = pvt.create_model("pvt_v2_b0").state_dict()
    ok = tmp_path / "mm.pth"
    meta = {"seed": np.int64(3), "best": np.float64(0.5), "hub": _MMHistory(), "CLASSES": ("a", "b")}
    torch.save({"meta": meta, "state_dict": sd}, ok)
    model = pvt.create_model("pvt_v2_b0", checkpoint=ok)
    assert model.load_report.backbone_loaded == model.load_report.backbone_total
    hostile = tmp_path / "hostile.pth"
    torch.save({"meta": {"x": _Runs()}, "state_dict": sd}, hostile)  # pickles builtins.print
    with pytest.raises(CheckpointError, match=r"hostile\.pth.*weights_only=True"):
        pvt.create_model("pvt_v2_b0", checkpoint=hostile)
    assert "executed" not in capsys.readouterr().out


def test_whole_model_of_another_shape_is_a_checkpoint_error() -> None:
    from pvt.checkpoint.loader import load_whole_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match=r"not a tiny head.*1 of another shape.*0\.weight \[3, 5\] vs \[3, 4\]"):
        load_whole_model(model, {"0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3)}, "a tiny head")
