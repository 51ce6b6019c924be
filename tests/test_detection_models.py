"""Detector wiring on PVT: feature levels, the P6 source, parameter counts, GMACs, a training step."""

from __future__ import annotations

import pytest
import torch

import pvt
import pvt.detection as D

# The papers' tables (M params, 80 classes): RetinaNet and Mask R-CNN, 1x.
RETINANET = {"pvt_tiny": 23.0, "pvt_small": 34.2, "pvt_medium": 53.9, "pvt_large": 71.1, "pvt_v2_b0": 13.0,
             "pvt_v2_b1": 23.8, "pvt_v2_b2_li": 32.3, "pvt_v2_b2": 35.1, "pvt_v2_b3": 55.0, "pvt_v2_b4": 72.3,
             "pvt_v2_b5": 91.7, "resnet18": 21.3, "resnet50": 37.7, "resnet101": 56.7}  # fmt: skip
MASK_RCNN = {"pvt_tiny": 32.9, "pvt_small": 44.1, "pvt_medium": 63.9, "pvt_large": 81.0, "pvt_v2_b0": 23.5,
             "pvt_v2_b1": 33.7, "pvt_v2_b2_li": 42.2, "pvt_v2_b2": 45.0, "pvt_v2_b3": 64.9, "pvt_v2_b4": 82.2,
             "pvt_v2_b5": 101.6, "resnet18": 31.2, "resnet50": 44.2, "resnet101": 63.2}  # fmt: skip


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("backbone", list(RETINANET))
def test_parameter_counts_match_papers(backbone: str) -> None:
    with torch.device("meta"):
        r, m = D.retinanet(backbone), D.mask_rcnn(backbone)
    assert _params_m(r) == pytest.approx(RETINANET[backbone], rel=0.01)
    assert _params_m(m) == pytest.approx(MASK_RCNN[backbone], rel=0.01)


@pytest.mark.parametrize(("backbone", "paper"), [("pvt_small", 285.8), ("pvt_v2_b2", 290.7), ("pvt_v2_b2_li", 227.4)])
def test_retinanet_gmacs_at_1280x800(backbone: str, paper: float) -> None:
    c = pvt.complexity(D.retinanet(backbone), (3, 800, 1280))
    assert c.gmacs == pytest.approx(paper, rel=0.03)


@pytest.mark.parametrize("backbone", ["pvt_v2_b0", "pvt_tiny", "resnet18"])
def test_retinanet_levels_and_p6_from_c5(backbone: str) -> None:
    model = D.retinanet(backbone).eval()
    seen: dict[str, torch.Tensor] = {}
    model.backbone.fpn.extra_blocks.p6.register_forward_hook(lambda m, a, o: seen.update(p6_in=a[0]))
    with torch.no_grad():
        x = torch.randn(1, 3, 128, 192)
        c = model.backbone.body(x)
        feats = model.backbone(x)
    assert list(feats) == ["0", "1", "2", "p6", "p7"]
    assert [f.shape[-2:] for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(f.shape[1] == 256 for f in feats.values())
    # P6 comes from C5 even when C5 already has 256 channels (v2-b0), unlike torchvision's default.
    assert torch.equal(seen["p6_in"], c[-1])


def test_mask_rcnn_levels() -> None:
    model = D.mask_rcnn("pvt_v2_b0").eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 128, 128))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    assert model.roi_heads.box_roi_pool.output_size == (7, 7)
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)


def _targets(masks: bool) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 120.0, 100.0]])
    t = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    if masks:
        m = torch.zeros(2, 128, 128, dtype=torch.uint8)
        m[0, 20:90, 10:60] = 1
        m[1, 30:100, 70:120] = 1
        t["masks"] = m
    return [t, {k: v.clone() for k, v in t.items()}]


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_one_training_step(kind: str) -> None:
    build = D.retinanet if kind == "retinanet" else D.mask_rcnn
    model = build("pvt_v2_b0", num_classes=3, min_size=128, max_size=128, fpn_channels=64).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    losses = model(images, _targets(kind == "mask_rcnn"))
    expected = {"classification", "bbox_regression"} if kind == "retinanet" else {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}  # fmt: skip
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.body.patch_embed1.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert {"boxes", "scores", "labels"} <= set(out[0])


def _mask_losses(model: torch.nn.Module, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same drop paths, RPN and RoI samples for every call
    return model([torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1)) for _ in targets], targets)


def test_mask_loss_leaves_out_instances_without_a_mask() -> None:
    """An instance flagged mask_valid False (its polygons were all degenerate) trains the box and
    RPN losses as before but gives no mask target: its (all-zero) mask does not move the mask loss,
    and with every instance maskless the mask loss is a zero that still backpropagates."""
    model = D.mask_rcnn("pvt_v2_b0", num_classes=3, min_size=128, max_size=128, fpn_channels=64).train()
    plain = _mask_losses(model, _targets(True))  # no mask_valid: torchvision's code path
    flagged = _targets(True)
    for t in flagged:
        t["mask_valid"] = torch.tensor([False, True])
        t["masks"][0] = 0  # what the data gives a maskless instance
    ours = _mask_losses(model, flagged)
    for k in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        assert torch.equal(ours[k], plain[k]), k  # same samples, same box losses
    assert not torch.allclose(ours["loss_mask"], plain["loss_mask"])
    for t in flagged:
        t["masks"][0] = 1  # any mask of the left-out instance: no effect
    assert torch.equal(_mask_losses(model, flagged)["loss_mask"], ours["loss_mask"])
    only_second = _targets(True)
    for t in only_second:
        t["mask_valid"] = torch.tensor([True, True])
    assert torch.equal(_mask_losses(model, only_second)["loss_mask"], plain["loss_mask"])  # all valid: unchanged
    for t in flagged:
        t["mask_valid"] = torch.tensor([False, False])
    none = _mask_losses(model, flagged)
    assert none["loss_mask"].item() == 0.0 and all(torch.isfinite(v) for v in none.values())
    sum(none.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None


def test_backbone_checkpoint_and_unknown_backbone() -> None:
    dense = pvt.create_model("pvt_v2_b0", features_only=True).state_dict()
    model = D.retinanet("pvt_v2_b0", backbone_checkpoint=dense)  # type: ignore[arg-type]
    assert torch.equal(model.backbone.body.block2[0].attn.q.weight, dense["block2.0.attn.q.weight"])
    report = model.backbone.body.load_report
    assert report.backbone_loaded == report.backbone_total and not report.dropped  # stage 1 feeds stage 2
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        D.retinanet("vgg16")


@pytest.mark.parametrize("detector", ["retinanet", "mask_rcnn"])
def test_labels_index_the_classes_from_zero(detector: str) -> None:
    """Every detector's ``labels`` index ``class_names`` directly (torchvision's Mask R-CNN counts
    its background as class 0; its output is shifted so that both detectors agree)."""
    import pvt.detection as D

    torch.manual_seed(0)
    build = D.retinanet if detector == "retinanet" else D.mask_rcnn
    model = build("pvt_v2_b0", num_classes=3, min_size=64, max_size=64).eval()
    with torch.no_grad():  # make class 2 (the third) win everywhere
        if detector == "retinanet":
            logits = model.head.classification_head.cls_logits
            logits.bias.copy_(torch.tensor([-9.0, -9.0, 9.0] * (logits.bias.numel() // 3)))
        else:
            model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-9.0, -9.0, -9.0, 9.0]))
            model.rpn._post_nms_top_n["testing"] = 50
    with torch.inference_mode():
        out = model([torch.rand(3, 64, 64)])[0]
    assert len(out["labels"]) > 0 and set(out["labels"].tolist()) == {2}
