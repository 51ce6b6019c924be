"""Mask R-CNN with ``semantics="mmdet"`` against mmdetection 3.3's own Mask R-CNN (committed references,
see tests/mmdet_reference.py: same seeded weights, same images, CPU, 1 thread), and the parts it is
made of: head conversion, RoI level mapping, mask pasting, the resize mapping and training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

import mmdet_reference as mref
from pvt.checkpoint import CheckpointError
from pvt.detection.convert import convert_detector, convert_mmdet_detector, read_detector_checkpoint
from pvt.detection.mmdet_compat import MMDetTransform, mmdet_paste_masks
from pvt.detection.mmdet_rcnn import (
    MMDetRoIAlign,
    convert_rcnn_heads,
)
from pvt.detection.models import mask_rcnn

REF = "mask_rcnn_pvtv2_b0"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The references were made with 1 thread (a second one only reorders float sums), and on the
    shared 2-core test machines one thread runs these small models several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# conversion


def _heads(num_classes: int = 3, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A small mmdet-layout RPN / RoI head state dict (random values, real layouts)."""
    g = gen or torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {
        "rpn_head.rpn_conv.weight": r(8, 8, 3, 3),
        "rpn_head.rpn_conv.bias": r(8),
        "rpn_head.rpn_cls.weight": r(3, 8, 1, 1),
        "rpn_head.rpn_cls.bias": r(3),
        "rpn_head.rpn_reg.weight": r(12, 8, 1, 1),
        "rpn_head.rpn_reg.bias": r(12),
        "roi_head.bbox_head.fc_cls.weight": r(num_classes + 1, 16),
        "roi_head.bbox_head.fc_cls.bias": r(num_classes + 1),
        "roi_head.bbox_head.fc_reg.weight": r(4 * num_classes, 16),
        "roi_head.bbox_head.fc_reg.bias": r(4 * num_classes),
        "roi_head.mask_head.upsample.weight": r(8, 8, 2, 2),
        "roi_head.mask_head.upsample.bias": r(8),
        "roi_head.mask_head.conv_logits.weight": r(num_classes, 8, 1, 1),
        "roi_head.mask_head.conv_logits.bias": r(num_classes),
    }
    for i in range(2):
        sd[f"roi_head.bbox_head.shared_fcs.{i}.weight"] = r(16, 16)
        sd[f"roi_head.bbox_head.shared_fcs.{i}.bias"] = r(16)
    for i in range(4):
        sd[f"roi_head.mask_head.convs.{i}.conv.weight"] = r(8, 8, 3, 3)
        sd[f"roi_head.mask_head.convs.{i}.conv.bias"] = r(8)
    return sd


def test_heads_convert_with_the_background_moved_first() -> None:
    sd = _heads(3)
    out, used = convert_rcnn_heads({**sd, "neck.x.weight": torch.zeros(1)}, 3)
    assert sorted(used) == sorted(sd)  # every head tensor, nothing else
    assert torch.equal(out["rpn.head.conv.0.0.weight"], sd["rpn_head.rpn_conv.weight"])
    assert torch.equal(out["rpn.head.cls_logits.bias"], sd["rpn_head.rpn_cls.bias"])
    assert torch.equal(out["rpn.head.bbox_pred.weight"], sd["rpn_head.rpn_reg.weight"])
    assert torch.equal(out["roi_heads.box_head.fc7.weight"], sd["roi_head.bbox_head.shared_fcs.1.weight"])
    cls = out["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls[0], sd["roi_head.bbox_head.fc_cls.weight"][3])  # background: last -> first
    assert torch.equal(cls[1:], sd["roi_head.bbox_head.fc_cls.weight"][:3])
    reg = out["roi_heads.box_predictor.bbox_pred.bias"]
    assert reg.shape == (16,) and not reg[:4].any() and torch.equal(reg[4:], sd["roi_head.bbox_head.fc_reg.bias"])
    assert torch.equal(out["roi_heads.mask_head.3.0.weight"], sd["roi_head.mask_head.convs.3.conv.weight"])
    assert torch.equal(out["roi_heads.mask_predictor.conv5_mask.weight"], sd["roi_head.mask_head.upsample.weight"])
    logits = out["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert (
        logits.shape[0] == 4
        and not logits[0].any()
        and torch.equal(logits[1:], sd["roi_head.mask_head.conv_logits.weight"])
    )
    # the same logits give the same class probabilities: softmax is order-free up to the permutation
    x = torch.randn(5, 16)
    ours = torch.softmax(x @ cls.T + out["roi_heads.box_predictor.cls_score.bias"], -1)
    theirs = torch.softmax(x @ sd["roi_head.bbox_head.fc_cls.weight"].T + sd["roi_head.bbox_head.fc_cls.bias"], -1)
    torch.testing.assert_close(ours[:, 1:], theirs[:, :3])


def test_head_conversion_refuses_what_it_cannot_place() -> None:
    sd = _heads(3)
    with pytest.raises(CheckpointError, match=r"fc_cls \(4 rows incl\. background\) holds 3 classes.*num_classes=20"):
        convert_rcnn_heads(sd, 20)
    agnostic = {
        **sd,
        "roi_head.bbox_head.fc_reg.weight": torch.zeros(4, 16),
        "roi_head.bbox_head.fc_reg.bias": torch.zeros(4),
    }
    with pytest.raises(CheckpointError, match=r"class-agnostic"):
        convert_rcnn_heads(agnostic, 3)
    softmax_rpn = {**sd, "rpn_head.rpn_cls.weight": torch.zeros(6, 8, 1, 1), "rpn_head.rpn_cls.bias": torch.zeros(6)}
    with pytest.raises(CheckpointError, match=r"rpn_cls has 6 channels for 3 anchors"):
        convert_rcnn_heads(softmax_rpn, 3)
    with pytest.raises(CheckpointError, match=r"unknown layout.*roi_head\.mask_head\.conv_extra"):
        convert_rcnn_heads({**sd, "roi_head.mask_head.conv_extra.weight": torch.zeros(1)}, 3)


def test_whole_mmdet_mask_rcnn_converts(tmp_path: Path) -> None:
    sd = mref.state_dict(REF)
    ckpt = convert_mmdet_detector(sd, "m.pth")
    assert (ckpt.detector, ckpt.backbone, ckpt.num_classes, ckpt.embed_norm_eps, ckpt.semantics) == (
        "mask_rcnn", "pvt_v2_b0", 80, 1e-6, "mmdet"
    )  # fmt: skip
    assert ckpt.report.mapped == len(sd) and not ckpt.report.ignored
    path = tmp_path / "m.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"m\.pth: the detector has 80 classes, but num_classes=20"):
        mask_rcnn("pvt_v2_b0", 20, checkpoint=str(path))


# ------------------------------------------------------------------------------------------------
# parts


def test_roi_levels_and_features_are_mmdets() -> None:
    pool = MMDetRoIAlign(7)
    sides = torch.tensor([8.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 2000.0])
    rois = torch.cat([torch.zeros(len(sides), 1), torch.zeros(len(sides), 2), sides[:, None].repeat(1, 2)], 1)
    assert pool.levels(rois).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # floor(log2(s / 56 + 1e-6)), P2..P5
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(2, 4, 64 >> i, 64 >> i, generator=g) for i in range(4)}
    boxes = [
        torch.tensor([[3.3, 5.1, 40.2, 30.7], [0.0, 0.0, 255.0, 250.0]]),
        torch.tensor([[10.0, 20.0, 150.5, 140.0]]),
    ]
    out = pool(feats, boxes)
    expect = [
        roi_align(feats["0"], [boxes[0][:1], boxes[1][:0]], 7, 1 / 4, sampling_ratio=0, aligned=True),
        roi_align(feats["2"], [boxes[0][1:], boxes[1][:0]], 7, 1 / 16, sampling_ratio=0, aligned=True),
        roi_align(feats["1"], [boxes[0][:0], boxes[1]], 7, 1 / 8, sampling_ratio=0, aligned=True),
    ]
    assert torch.equal(out, torch.cat(expect))


def test_windowed_paste_is_mmdets_full_paste() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(12, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(12, 2, generator=g) * 30], 1)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # zero width
    masks = torch.rand(12, 1, 28, 28, generator=g)
    ours = mmdet_paste_masks(masks, boxes, (70, 90))
    full = mmdet_paste_masks(masks, boxes, (70, 90), window=False)
    assert torch.equal(ours[1:] >= 0.5, full[1:] >= 0.5)
    inside = ours > 0
    assert torch.equal(ours[inside], full[inside])
    # a zero-width box: both paths sample the mask's middle column, mmdet's CPU path only within its window
    assert torch.nonzero(ours[0, 0])[:, 1].unique().tolist() == [9, 10]


def test_postprocess_maps_a_resized_image_back() -> None:
    t = MMDetTransform(800, 1333).eval()
    masks = torch.zeros(1, 1, 28, 28)
    masks[..., 7:21, 7:21] = 1.0
    pred = {"boxes": torch.tensor([[100.0, 200.0, 500.0, 600.0]]), "masks": masks}
    out = t.postprocess([pred], [(800, 1000)], [(256, 320)])[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[32.0, 64.0, 160.0, 192.0]]))  # / (1000/320, 800/256)
    assert out["masks"].shape == (1, 1, 256, 320) and set(out["masks"].unique().tolist()) == {0.0, 1.0}
    ys, xs = torch.nonzero(out["masks"][0, 0], as_tuple=True)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (96, 159, 64, 127)  # the box's middle half


def test_mmdet_mask_rcnn_trains() -> None:
    torch.manual_seed(0)
    model = mask_rcnn("pvt_v2_b0", 3, semantics="mmdet", min_size=128, max_size=160, head_width=32).train()
    masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
    masks[0, 20:60, 10:70] = 1
    masks[1, 70:120, 90:150] = 1
    target = {
        "boxes": torch.tensor([[10.0, 20, 70, 60], [90, 70, 150, 120]]),
        "labels": torch.tensor([1, 3]),
        "masks": masks,
    }
    losses = model([torch.rand(3, 128, 160)], [target])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()  # type: ignore[union-attr]
    for name in ("backbone.body", "rpn.head", "roi_heads.box_head", "roi_heads.mask_predictor"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    with torch.inference_mode():  # and the whole eval forward, end to end, on a portrait image
        out = model.eval()([torch.rand(3, 150, 100)])[0]
    n = len(out["scores"])
    assert out["boxes"].shape == (n, 4) and out["masks"].shape == (n, 1, 150, 100) and n <= 100
    assert bool((out["boxes"][:, 2:] <= torch.tensor([100.0, 150.0])).all()) and bool((out["labels"] >= 0).all())


# ------------------------------------------------------------------------------------------------
# parity with mmdetection 3.3


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The reference's weights through the path a user takes: mmengine file -> safetensors -> builder."""
    tmp = tmp_path_factory.mktemp("mask_rcnn")
    src = tmp / "mask_rcnn.pth"
    torch.save(
        {"meta": {"dataset_meta": {"classes": [f"c{i}" for i in range(80)]}}, "state_dict": mref.state_dict(REF)}, src
    )
    dst = tmp / "converted.safetensors"
    convert_detector(src, dst)
    assert read_detector_checkpoint(dst).semantics == "mmdet"
    model = mask_rcnn("pvt_v2_b0", checkpoint=str(dst)).eval()
    assert model.semantics == "mmdet" and model.embed_norm_eps == 1e-6
    model.transform.resize_enabled = False  # the reference's Resize(scale_factor=1.0)
    return model


def _per_level(t: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x[0] for x in t]  # [1, C, H, W] -> [C, H, W] (mmdet's layout: channel = anchor * 4 + k)


@pytest.mark.parametrize("index", [0, 1])
def test_mask_rcnn_matches_mmdetection(converted: torch.nn.Module, index: int) -> None:
    model = converted
    ref = mref.reference(REF)
    r = ref["images"][index]
    image = mref.images(ref["image_seed"], ref["image_sha256"])[index]
    x = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    with torch.inference_mode():  # GeneralizedRCNN.forward's steps, to see the raw outputs on the way
        il, _ = model.transform([x])
        feats = model.backbone(il.tensors)
        objectness, deltas = model.rpn.head(list(feats.values()))
        proposals, scores = model.rpn.predict(il, feats)
        detections, _ = model.roi_heads(feats, proposals, il.image_sizes)
        out = model.transform.postprocess(detections, il.image_sizes, [(r["height"], r["width"])])[0]
        # the RoI heads on mmdet's own RoIs and detections isolate them from the proposal order
        rh = model.roi_heads
        rois = r["proposals"][: len(r["rcnn_cls_score"])]
        cls, reg = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, [rois], il.image_sizes)))
        mask_logits = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, [r["boxes"][:10]], il.image_sizes)))
    for ours, want in zip(
        mref.sampled(_per_level(objectness), r["rpn_cls_logits"]), r["rpn_cls_logits"]["values"], strict=True
    ):
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    for ours, want in zip(
        mref.sampled(_per_level(deltas), r["rpn_bbox_deltas"]), r["rpn_bbox_deltas"]["values"], strict=True
    ):
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    assert len(proposals[0]) == r["num_proposals"]
    # proposals: each of mmdet's first 200 is one of ours, to float noise (coordinates up to 640 px)
    dist, nearest = torch.cdist(r["proposals"], proposals[0], p=float("inf")).min(1)
    assert dist.max() <= 1e-3, f"proposal coordinates differ by up to {dist.max():.2e} px"
    torch.testing.assert_close(scores[0][nearest], r["proposal_scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([cls[:, 1:], cls[:, :1]], 1), r["rcnn_cls_score"], atol=1e-4, rtol=0)
    torch.testing.assert_close(reg[:, 4:], r["rcnn_bbox_pred"], atol=1e-4, rtol=0)
    picked = mask_logits[torch.arange(10), r["labels"][:10] + 1]
    torch.testing.assert_close(picked, r["mask_logits"], atol=1e-4, rtol=0)
    # detections: >= 98% matched one to one; the unmatched only at the 100 cut-off or the score threshold
    ours = {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"]}
    matched, missed, _ = mref.match_detections(ours, r)
    assert len(matched) >= 0.98 * len(r["scores"]), f"{r['name']}: unmatched mmdet detections {missed}"
    cut = float(r["scores"].min())
    assert all(float(r["scores"][i]) - cut < 1e-3 or float(r["scores"][i]) < 0.05 + 1e-3 for i in missed), missed
    theirs = mref.unpack_masks(r)
    ious = [mref.mask_iou(theirs[i], out["masks"][j, 0].numpy() >= 0.5) for i, j in matched]
    assert min(ious) >= 0.99, f"{r['name']}: mask IoU down to {min(ious):.4f}"
    # mmdet's own mask logits pasted on mmdet's boxes give mmdet's masks bit for bit
    probs = r["mask_logits"][:, None].sigmoid()
    pasted = mmdet_paste_masks(probs, r["boxes"][:10], (r["height"], r["width"]))[:, 0] >= 0.5
    assert np.array_equal(pasted.numpy(), theirs[:10])
