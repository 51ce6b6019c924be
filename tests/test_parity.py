"""Parity with independent implementations: timm's pvt_v2_* and HF transformers' Pvt / PvtV2.

Each peer model gets random weights (perturbed so that every norm and bias differs from its
init), its own state dict goes through our layout converter, and the logits must agree within
1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

import pvt
from conftest import perturb_
from pvt.bench.peers import hf_v1_config, hf_v2_config, match_hf_eps_
from pvt.checkpoint import detect_layout

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

V2 = pvt.list_models("pvt_v2_*")
V1 = ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"]
ATOL = 1e-5


def _x(size: tuple[int, int]) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(2, 3, *size)


@pytest.mark.parametrize("name", V2)
def test_timm_pvt_v2_logits_match(name: str) -> None:
    peer = perturb_(timm.create_model(name, pretrained=False)).eval()
    sd = peer.state_dict()
    assert detect_layout(sd) == "timm"
    ours = pvt.create_model(name, checkpoint=sd).eval()
    assert ours.load_report.layout == "timm" and not ours.load_report.missing
    x = _x((96, 128))
    with torch.no_grad():
        want, got = peer(x), ours(x)
    assert want.abs().max() > 0.1  # a real signal, not near-zero logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_timm_features_match() -> None:
    peer = perturb_(timm.create_model("pvt_v2_b1", pretrained=False)).eval()
    ours = pvt.create_model("pvt_v2_b1", features_only=True, checkpoint=peer.state_dict()).eval()
    assert set(ours.load_report.dropped) == {"head.weight", "head.bias"}
    x = _x((75, 99))
    with torch.no_grad():
        want = peer.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(ours(x), want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", V1)
def test_hf_pvt_v1_logits_match(name: str) -> None:
    peer = perturb_(transformers.PvtForImageClassification(hf_v1_config(name, num_labels=1000))).eval()
    sd = peer.state_dict()
    assert detect_layout(sd) == "hf_pvt"
    ours = match_hf_eps_(pvt.create_model(name, checkpoint=sd)).eval()
    # HF resizes position tables with its own (224-only) shortcut, so compare at 224.
    x = _x((224, 224))
    with torch.no_grad():
        want, got = peer(x).logits, ours(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", V2)
def test_hf_pvt_v2_logits_match(name: str) -> None:
    peer = perturb_(transformers.PvtV2ForImageClassification(hf_v2_config(name, num_labels=1000))).eval()
    sd = peer.state_dict()
    assert detect_layout(sd) == "hf_pvt_v2"
    ours = match_hf_eps_(pvt.create_model(name, checkpoint=sd)).eval()
    x = _x((96, 128))
    with torch.no_grad():
        want, got = peer(x).logits, ours(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_hf_pvt_v2_backbone_wrapper_features_match() -> None:
    cfg = hf_v2_config("pvt_v2_b0", out_features=["stage1", "stage2", "stage3", "stage4"])
    peer = perturb_(transformers.PvtV2Backbone(cfg)).eval()
    ours = match_hf_eps_(pvt.create_model("pvt_v2_b0", features_only=True, checkpoint=peer.state_dict()))
    assert ours.load_report.layout == "hf_pvt_v2"
    x = _x((64, 96))
    with torch.no_grad():
        want = peer(x).feature_maps
        got = ours.eval()(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_hf_pvt_model_without_head_loads_into_dense_model() -> None:
    peer = perturb_(transformers.PvtModel(hf_v1_config("pvt_tiny"))).eval()
    ours = match_hf_eps_(pvt.create_model("pvt_tiny", features_only=True, checkpoint=peer.state_dict()))
    assert set(ours.load_report.dropped) == {"cls_token", "norm.weight", "norm.bias"}
