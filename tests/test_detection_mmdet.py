"""mmdetection semantics for RetinaNet, the shared mmdet arithmetic, and whole-detector conversion.

The parity tests compare with mmdetection 3.3's own outputs, committed under tests/reference/mmdet/
(see tests/mmdet_reference.py): same seeded weights, same images, CPU, 1 thread for the reference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import mmdet_reference as mref
from pvt.checkpoint import CheckpointError, save_safetensors, to_official
from pvt.detection.convert import (
    convert_detector,
    convert_mmdet_detector,
    read_detector_checkpoint,
)
from pvt.detection.mmdet_compat import (
    MMDET_MAX_RATIO,
    MMDetAnchorGenerator,
    MMDetTransform,
    cv2_resize_linear_u8,
    mmdet_batched_nms,
    mmdet_decode,
    mmdet_nms,
    rescale_size,
)
from pvt.detection.models import LastLevelP6P7FromC5, mask_rcnn, retinanet
from pvt.models import create_model

RETINA = {"retinanet_pvtv2_b0": "pvt_v2_b0", "retinanet_pvt_s": "pvt_small"}


# ------------------------------------------------------------------------------------------------
# embed_norm_eps


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0"])
def test_embed_norm_eps_reaches_the_embedding_and_reduction_norms(name: str) -> None:
    a = create_model(name, features_only=True).eval()
    b = create_model(name, features_only=True, embed_norm_eps=1e-6).eval()
    b.load_state_dict(a.state_dict())
    eps = {n: m.eps for n, m in b.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    embed = {
        n: e for n, e in eps.items() if n.endswith("attn.norm") or (n.startswith("patch_embed") and n.endswith(".norm"))
    }
    assert embed and all(e == 1e-6 for e in embed.values())
    assert all(e == 1e-6 for n, e in eps.items() if n not in embed)  # block and stage norms: always 1e-6
    assert all(m.eps == 1e-5 for n, m in a.named_modules() if n in embed)
    x = torch.randn(1, 3, 64, 64) * 0.01  # small activations: the eps matters
    with torch.no_grad():
        fa, fb = a(x), b(x)
    assert any(not torch.equal(u, v) for u, v in zip(fa, fb, strict=True))


# ------------------------------------------------------------------------------------------------
# anchors, decode, NMS


def test_anchor_generator_matches_mmdet_values() -> None:
    retina = MMDetAnchorGenerator((8, 16, 32, 64, 128), octave_base_scale=4, scales_per_octave=3)
    l0 = retina.cell_anchors[0]
    expect = torch.tensor([[-22.6274, -11.3137, 22.6274, 11.3137], [-35.9188, -17.9594, 35.9188, 17.9594]])
    torch.testing.assert_close(l0[[0, 2]], expect, atol=1e-4, rtol=0)
    assert l0[3:6, 0].tolist() == [-16.0, -20.158737182617188, -25.398416519165039]  # ratio 1: not rounded
    # mmdet's arithmetic: scales in float64 -> float32, then (stride * w_ratio) * scale in float32
    scales = torch.tensor([4 * 2 ** (i / 3) for i in range(3)], dtype=torch.float64).float()
    w_ratio = 1 / torch.sqrt(torch.tensor([0.5, 1.0, 2.0]))
    assert torch.equal(l0[:, 2], 0.5 * (8 * w_ratio[:, None] * scales[None, :]).view(-1))
    rpn = MMDetAnchorGenerator((4, 8, 16, 32, 64), scales=(8,))
    torch.testing.assert_close(
        rpn.cell_anchors[0],
        torch.tensor(
            [[-22.6274, -11.3137, 22.6274, 11.3137], [-16, -16, 16, 16], [-11.3137, -22.6274, 11.3137, 22.6274]]
        ),
        atol=1e-4,
        rtol=0,
    )
    # fixed strides: P6 of an 800x1216 input is 13x19; torchvision would infer 800 // 13 = 61
    feats = [torch.zeros(1, 1, h, w) for h, w in [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]]
    anchors = retina(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)]), feats)[0]
    assert anchors.shape == (9 * sum(f.shape[-1] * f.shape[-2] for f in feats), 4)
    p6_start = 9 * sum(f.shape[-1] * f.shape[-2] for f in feats[:3])
    last_p6 = anchors[p6_start + 9 * (13 * 19 - 1)]  # cell (12, 18), ratio 0.5, scale 0
    assert torch.equal(last_p6, retina.cell_anchors[3][0] + torch.tensor([18 * 64, 12 * 64] * 2).float())


def test_decode_clamps_both_sides_and_clips() -> None:
    anchors = torch.tensor([[10.0, 20.0, 50.0, 40.0]] * 4)
    deltas = torch.tensor(
        [[0.0, 0.0, -10.0, 0.0], [0.0, 0.0, 10.0, 0.0], [0.5, -0.25, 0.1, -0.2], [0.0, 0.0, 0.0, 0.0]]
    )
    out = mmdet_decode(deltas, anchors)
    w = out[:, 2] - out[:, 0]
    # dw = -10 is clamped to -4.135 (torchvision clamps only above and would give 40 * exp(-10))
    torch.testing.assert_close(w[0], torch.tensor(40 * math.exp(-MMDET_MAX_RATIO)), rtol=1e-6, atol=0)
    torch.testing.assert_close(w[1], torch.tensor(40 * math.exp(MMDET_MAX_RATIO)), rtol=1e-6, atol=0)
    # centre (p1 + p2) * 0.5 + pw * dx, size pw * exp(dw), no +1
    cx, cy, hw, hh = 30 + 40 * 0.5, 30 - 20 * 0.25, 20 * math.exp(0.1), 10 * math.exp(-0.2)
    torch.testing.assert_close(out[2], torch.tensor([cx - hw, cy - hh, cx + hw, cy + hh]))
    assert torch.equal(out[3], anchors[3])
    clipped = mmdet_decode(deltas, anchors, img_hw=(35, 60))
    assert clipped[:, 0::2].min() >= 0 and clipped[:, 0::2].max() <= 60 and clipped[:, 1::2].max() <= 35
    assert clipped[1, 2] == 60 and clipped[1, 0] == 0  # clipped to [0, W], not W - 1
    # stds multiply; class-specific [N, 4k] deltas decode each class on the same box
    rcnn = mmdet_decode(deltas[2:3].repeat(1, 3), anchors[:1], stds=(0.1, 0.1, 0.2, 0.2))
    assert rcnn.shape == (1, 12) and torch.equal(rcnn[0, :4], rcnn[0, 8:])


def _random_boxes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xy = torch.rand(n, 2, generator=gen) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 80 + 1], dim=1)
    return boxes, torch.rand(n, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def test_batched_nms_offset_trick_equals_per_class_nms() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (50, 400, 1500):
        boxes, scores, labels = _random_boxes(n, gen)
        keep = mmdet_batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(scores[keep], scores[keep].sort(descending=True)[0])
        per_class = torch.cat([torch.nonzero(labels == c)[:, 0][mmdet_nms(boxes[labels == c], scores[labels == c], 0.5)]
                               for c in range(5)])  # fmt: skip
        assert set(keep.tolist()) == set(per_class.tolist())
        split = mmdet_batched_nms(boxes, scores, labels, 0.5, split_thr=10)  # mmcv's per-class branch
        assert torch.equal(split, keep)
    # the offset separates classes: two identical boxes of different labels both survive
    same = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    assert mmdet_batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist() == [0, 1]
    assert mmdet_batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.5).tolist() == [0]


def test_nms_threshold_is_compared_in_float32() -> None:
    # IoU exactly float32(0.6) > 0.6 in double: mmcv (float compare) keeps the box, a double compare drops it
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    for w in np.linspace(5.0, 10.0, 2001):
        b = torch.tensor([[0.0, 0.0, float(w), 10.0]])
        iou = float((b[0, 2] * 10) / 100)
        if iou == float(np.float32(0.6)) and iou > 0.6:
            keep = mmdet_nms(torch.cat([a, b]), torch.tensor([0.9, 0.8]), 0.6)
            assert keep.tolist() == [0, 1]
            return
    pytest.skip("no box with IoU exactly float32(0.6) on this grid")


# ------------------------------------------------------------------------------------------------
# preprocessing


def test_rescale_size_is_mmcvs() -> None:
    # factor min(1333 / long, 800 / short), int(x * factor + 0.5)
    assert rescale_size(640, 480, (1333, 800)) == ((1067, 800), 800 / 480)
    assert rescale_size(1216, 800, (1333, 800)) == ((1216, 800), 1.0)
    assert rescale_size(2000, 500, (1333, 800))[0] == (1333, 333)  # long side bound: 500 * 0.6665 = 333.25
    assert rescale_size(512, 512, (800, 1333))[0] == (800, 800)  # scale given (short, long)


def test_resize_is_opencvs_inter_linear_bit_for_bit() -> None:
    ref = torch.load(Path(__file__).parent / "reference" / "opencv" / "resize_linear.pt", weights_only=True)
    for case in ref["cases"]:
        img = case["image"].permute(2, 0, 1).float()
        ours = cv2_resize_linear_u8(img, tuple(case["size"]))
        assert torch.equal(ours, case["out"].permute(2, 0, 1).float()), (tuple(img.shape), case["size"])
    # the transform takes this path for 8-bit images, float or uint8
    t = MMDetTransform(20, 27).eval()
    two_x = ref["cases"][2]  # 40x54 -> 20x27
    il, _ = t([two_x["image"].permute(2, 0, 1).float() / 255])
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    assert torch.equal(il.tensors[0, :, :20, :27], (two_x["out"].permute(2, 0, 1).float() - mean) / std)


def test_transform_normalises_pads_and_maps_back() -> None:
    t = MMDetTransform(800, 1333).eval()
    img8 = torch.randint(0, 256, (3, 100, 70), dtype=torch.uint8)
    f = img8.float() / 255  # what to_dtype(scale=True) gives, up to float rounding: snapped back
    il_u8, _ = t([img8])
    il_f, _ = t([torch.from_numpy(np.float32(img8.numpy()) * np.float32(1 / 255))])
    il_f2, _ = t([f])
    assert torch.equal(il_u8.tensors, il_f.tensors) and torch.equal(il_u8.tensors, il_f2.tensors)
    (nh, nw), = il_u8.image_sizes  # fmt: skip
    assert (nw, nh) == rescale_size(70, 100, (1333, 800))[0] == (800, 1143)  # short side bound: 70 * 800 / 70
    assert il_u8.tensors.shape[-2:] == (1152, 800)  # padded to 32 with zeros, after normalisation
    assert il_u8.tensors[:, :, nh:].abs().sum() == 0 and il_u8.tensors[:, :, :, nw:].abs().sum() == 0
    ident = MMDetTransform(800, 1333, resize=False).eval()
    x, _ = ident([img8])
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    assert torch.equal(x.tensors[0, :, :100, :70], (img8.float() - mean) / std)
    # boxes back by division by (new_w / w, new_h / h); masks pasted at the original size, 0 / 1
    boxes = torch.tensor([[93.3, 133.3, 466.5, 666.5]])
    out = t.postprocess(
        [{"boxes": boxes.clone(), "masks": torch.ones(1, 1, 28, 28) * 0.7}], il_u8.image_sizes, [(100, 70)]
    )[0]
    sf = torch.tensor([nw / 70, nh / 100] * 2, dtype=torch.float32)
    assert torch.equal(out["boxes"], boxes / sf)
    assert out["masks"].shape == (1, 1, 100, 70) and set(out["masks"].unique().tolist()) == {0.0, 1.0}


def test_mmdet_retinanet_trains() -> None:
    model = retinanet("pvt_v2_b0", 3, semantics="mmdet", fpn_channels=32, min_size=(96, 128), max_size=160)
    assert isinstance(model.backbone.fpn.extra_blocks, LastLevelP6P7FromC5)
    assert not model.backbone.fpn.extra_blocks.relu_before_p7
    model.train()
    images = [torch.rand(3, 128, 96), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0]]), "labels": torch.tensor([2])}]  # fmt: skip
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.head.classification_head.cls_logits.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 90)])
    assert out[0]["boxes"].shape[1] == 4 and len(out[0]["boxes"]) <= 100


# ------------------------------------------------------------------------------------------------
# conversion


def _write(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "det.pth") -> Path:
    path = tmp_path / name
    torch.save({"meta": {"dataset_meta": {"classes": [f"c{i}" for i in range(80)]}}, "state_dict": sd}, path)
    return path


def test_converter_is_strict(tmp_path: Path) -> None:
    sd = mref.state_dict("retinanet_pvtv2_b0")
    ckpt = convert_mmdet_detector(sd, "x.pth")
    assert (ckpt.detector, ckpt.backbone, ckpt.num_classes, ckpt.embed_norm_eps) == ("retinanet", "pvt_v2_b0", 80, 1e-6)
    assert ckpt.report.mapped == len(sd) and not ckpt.report.ignored
    bad = _write(tmp_path, {**sd, "bbox_head.extra_conv.weight": torch.zeros(1)}, "unknown_key.pth")
    with pytest.raises(CheckpointError, match=r"unknown_key\.pth.*bbox_head\.extra_conv"):
        read_detector_checkpoint(bad)
    no_conv = {k: v for k, v in sd.items() if not k.startswith("bbox_head.cls_convs.3.")}
    with pytest.raises(CheckpointError, match=r"three\.pth: unknown RetinaNet head layout"):
        read_detector_checkpoint(_write(tmp_path, no_conv, "three.pth"))
    with pytest.raises(CheckpointError, match=r"unknown detector head layout"):
        read_detector_checkpoint(
            _write(tmp_path, {k: v for k, v in sd.items() if not k.startswith("bbox_head.")}, "h.pth")
        )
    good = _write(tmp_path, sd)
    assert read_detector_checkpoint(good).class_names == [f"c{i}" for i in range(80)]
    with pytest.raises(CheckpointError, match=r"det\.pth: the detector has 80 classes, but num_classes=20"):
        retinanet("pvt_v2_b0", 20, checkpoint=str(good))
    with pytest.raises(CheckpointError, match=r"det\.pth: its backbone is pvt_v2_b0, but pvt_v2_b1 was requested"):
        retinanet("pvt_v2_b1", checkpoint=str(good))


def test_a_runs_own_file_loads_as_a_whole_detector(tmp_path: Path) -> None:
    """What the trainer writes (``model.safetensors`` with ``arch``): backbone and classes from the
    file, torchvision semantics unless the caller says otherwise; a wrong detector is refused."""
    small = dict(fpn_channels=32, min_size=128, max_size=160)
    trained = retinanet("pvt_v2_b0", 5, **small).eval()
    save_safetensors(trained.state_dict(), tmp_path / "model.safetensors", arch="retinanet_pvt_v2_b0")
    loaded = retinanet("pvt_v2_b0", 5, checkpoint=str(tmp_path / "model.safetensors"), **small).eval()
    assert loaded.semantics == "torchvision"
    x = torch.rand(3, 128, 160)
    with torch.inference_mode():
        a, b = trained([x])[0], loaded([x])[0]
    assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a retinanet checkpoint, not a mask_rcnn"):
        mask_rcnn("pvt_v2_b0", 5, checkpoint=str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not fit"):  # another FPN width than the file's
        retinanet("pvt_v2_b0", 5, checkpoint=str(tmp_path / "model.safetensors"), min_size=128, max_size=160)


def test_class_names_from_an_mmengine_saved_meta(tmp_path: Path) -> None:
    """mmengine's ``save_checkpoint`` meta (mmdet 3.x): the classes are ``meta.dataset_meta.classes``."""
    sample = torch.load(mref.MMENGINE_META_SAMPLE, map_location="cpu", weights_only=True)
    sample["state_dict"] = mref.state_dict("retinanet_pvtv2_b0")
    torch.save(sample, tmp_path / "mmengine.pth")
    ckpt = read_detector_checkpoint(tmp_path / "mmengine.pth")
    assert ckpt.class_names == list(sample["meta"]["dataset_meta"]["classes"]) and len(ckpt.class_names) == 80
    # mmdet 2.x kept them as meta.CLASSES
    torch.save({"meta": {"CLASSES": tuple(ckpt.class_names)}, "state_dict": sample["state_dict"]}, tmp_path / "v2.pth")
    assert read_detector_checkpoint(tmp_path / "v2.pth").class_names == ckpt.class_names


# ------------------------------------------------------------------------------------------------
# parity with mmdetection 3.3


def _raw_outputs(
    model: torch.nn.Module, image: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per level [A*K, H, W] logits, [A*4, H, W] deltas (mmdet's layout) and [H*W*A, 4] anchors."""
    il, _ = model.transform([image])
    feats = list(model.backbone(il.tensors).values())
    head = model.head(feats)
    per = [f.shape[-2] * f.shape[-1] * 9 for f in feats]
    anchors = model.anchor_generator(il, feats)[0].split(per)
    logits = [c.reshape(f.shape[-2], f.shape[-1], -1).permute(2, 0, 1)
              for c, f in zip(head["cls_logits"][0].split(per), feats, strict=True)]  # fmt: skip
    deltas = [r.reshape(f.shape[-2], f.shape[-1], -1).permute(2, 0, 1)
              for r, f in zip(head["bbox_regression"][0].split(per), feats, strict=True)]  # fmt: skip
    return logits, deltas, list(anchors)


@pytest.mark.parametrize("ref_name", list(RETINA))
def test_retinanet_matches_mmdetection(ref_name: str, tmp_path: Path) -> None:
    ref = mref.reference(ref_name)
    images = mref.images(ref["image_seed"], ref["image_sha256"])
    if ref_name == "retinanet_pvtv2_b0":
        # the path a user takes: mmengine checkpoint -> converted safetensors -> builder
        src = _write(tmp_path, mref.state_dict(ref_name))
        dst = tmp_path / "converted.safetensors"
        convert_detector(src, dst)
        own = read_detector_checkpoint(dst)
        assert (own.semantics, own.embed_norm_eps, own.source_format) == ("mmdet", 1e-6, "pvt-vision")
        model = retinanet(RETINA[ref_name], checkpoint=str(dst)).eval()
    else:  # in memory (a 36M-parameter file round trip costs more than the comparison)
        ckpt = convert_mmdet_detector(mref.state_dict(ref_name), ref_name)
        model = retinanet(RETINA[ref_name], semantics=ckpt.semantics, embed_norm_eps=ckpt.embed_norm_eps).eval()
        ckpt.load_into(model)
    assert model.semantics == "mmdet"
    model.transform.resize_enabled = False  # the reference's Resize(scale_factor=1.0)
    for img, r in zip(images, ref["images"], strict=True):
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        with torch.inference_mode():
            logits, deltas, anchors = _raw_outputs(model, x)
            out = model([x])[0]
        for ours, want in zip(mref.sampled(logits, r["cls_logits"]), r["cls_logits"]["values"], strict=True):
            torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
        for ours, want in zip(mref.sampled(deltas, r["bbox_deltas"]), r["bbox_deltas"]["values"], strict=True):
            torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
        for lvl, a in enumerate(anchors):
            assert len(a) == r["anchors"]["count"][lvl]
            assert torch.equal(a[r["anchors"]["index"][lvl]], r["anchors"]["values"][lvl])
        matched, missed, _ = mref.match_detections(out, r)
        assert len(matched) >= 0.98 * len(r["scores"]), f"{r['name']}: unmatched mmdet detections {missed}"


def test_authors_layout_loads_with_official_eps(tmp_path: Path) -> None:
    """The same weights with the backbone in the official names (the authors' mmdet-2.13 files) load
    with eps 1e-5 and compute what the mmdet-layout file computes with that eps."""
    sd = mref.state_dict("retinanet_pvtv2_b0")
    body = to_official({k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}, "mmdet")
    authors = {
        **{f"backbone.{k}": v for k, v in body.items()},
        **{k: v for k, v in sd.items() if not k.startswith("backbone.")},
    }
    path = _write(tmp_path, authors, "authors.pth")
    ckpt = read_detector_checkpoint(path)
    assert (ckpt.backbone, ckpt.embed_norm_eps, ckpt.source_format) == ("pvt_v2_b0", 1e-5, "official")
    small = dict(min_size=128, max_size=160)  # keep the 128x160 input as it is
    ours = retinanet("pvt_v2_b0", checkpoint=str(path), **small).eval()
    mm = retinanet("pvt_v2_b0", checkpoint=str(_write(tmp_path, sd)), embed_norm_eps=1e-5, **small).eval()
    x = torch.rand(3, 128, 160)
    with torch.inference_mode():
        a, b = ours([x])[0], mm([x])[0]
    assert len(a["scores"]) > 0 and all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
