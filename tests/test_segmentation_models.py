"""Semantic FPN wiring, parameter counts and GMACs against the papers, inference and the metric."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pvt
from pvt.segmentation import confusion_matrix, infer, segmentation_metrics, semantic_fpn
from pvt.segmentation.data import eval_size
from pvt.segmentation.inference import slide_logits

# The papers' ADE20K table: (M params with 150 classes, GMACs at 512x512).
PAPER = {"pvt_tiny": (17.0, 33.2), "pvt_small": (28.2, 44.5), "pvt_medium": (48.0, 61.0), "pvt_large": (65.1, 79.6),
         "pvt_v2_b0": (7.6, 25.0), "pvt_v2_b1": (17.8, 34.2), "pvt_v2_b2_li": (26.3, 41.0), "pvt_v2_b2": (29.1, 45.8),
         "pvt_v2_b3": (49.0, 62.4), "pvt_v2_b4": (66.3, 81.3), "pvt_v2_b5": (85.7, 91.1)}  # fmt: skip


@pytest.mark.parametrize("backbone", list(PAPER))
def test_parameter_counts_and_gmacs_match_papers(backbone: str) -> None:
    params, gmacs = PAPER[backbone]
    model = semantic_fpn(backbone).eval()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, rel=0.01)
    assert pvt.complexity(model, (3, 512, 512)).gmacs == pytest.approx(gmacs, rel=0.03)


def test_resnet_baselines_build() -> None:
    with torch.device("meta"):
        model = semantic_fpn("resnet50")
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(28.5, rel=0.01)  # the papers' R50


def test_head_wiring_and_any_input_size() -> None:
    model = semantic_fpn("pvt_v2_b0", num_classes=7).eval()
    convs = [sum(isinstance(m, nn.Conv2d) for m in h.modules()) for h in model.head.scale_heads]
    ups = [sum(isinstance(m, nn.Upsample) for m in h.modules()) for h in model.head.scale_heads]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]  # mmseg FPNHead: log2(stride / 4) stages
    assert model.head.classifier.in_channels == 128 and isinstance(model.head.dropout, nn.Dropout2d)
    seen: dict[str, torch.Tensor] = {}
    model.head.classifier.register_forward_hook(lambda m, a, o: seen.update(logits=o))
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 128, 96))
        out = model(torch.rand(1, 3, 100, 130))  # not a multiple of 32
    assert list(feats) == ["0", "1", "2", "3"] and [f.shape[1] for f in feats.values()] == [256] * 4
    assert [f.shape[-2:] for f in feats.values()] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert out.shape == (1, 7, 100, 130)
    assert seen["logits"].shape[-2:] == (25, 33)  # classified at stride 4, then upsampled


def test_eval_size_aligns_to_32() -> None:
    assert eval_size(512, 683, (2048, 512)) == (512, 704)  # short side 512, 683 -> up to 704
    assert eval_size(300, 4000, (2048, 512)) == (160, 2048)  # long side bound 2048 wins
    assert eval_size(256, 256, (2048, 512), ratio=0.5) == (256, 256)


def test_slide_equals_whole_for_a_pointwise_model() -> None:
    model = nn.Conv2d(3, 4, 1)
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.allclose(slide_logits(model, x, (32, 48), (20, 30)), model(x), atol=1e-6)
        probs = infer(model, x[0], scale=(90, 70), align=1, mode="slide", crop=(32, 32), stride=(16, 16), flip=True)
    assert probs.shape == (4, 70, 90) and torch.allclose(probs.sum(0), torch.ones(70, 90))


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])  # class 3 never in the labels; 255 ignored
    cm = confusion_matrix(pred, label, num_classes=5)
    expected = torch.zeros(5, 5, dtype=torch.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (0, 3)]:
        expected[t, p] += 1
    assert torch.equal(cm, expected)
    m = segmentation_metrics(cm, ["a", "b", "c", "d", "e"])
    # IoU: a 1/(3+2-1)=1/4, b 2/(2+3-2)=2/3, c 1/(2+1-1)=1/2, d 0/(0+1-0)=0, e absent (left out).
    assert m["iou/a"] == pytest.approx(25.0) and m["iou/b"] == pytest.approx(200 / 3)
    assert m["iou/c"] == pytest.approx(50.0) and m["iou/d"] == 0.0 and math.isnan(m["iou/e"])
    assert m["mIoU"] == pytest.approx(100 * (1 / 4 + 2 / 3 + 1 / 2 + 0) / 4)
    # Acc (recall): a 1/3, b 2/2, c 1/2; d and e have no labelled pixels.
    assert m["mAcc"] == pytest.approx(100 * (1 / 3 + 1 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(100 * 4 / 7)
