"""Registry-wide tests of the backbone contract, exactness to the papers, and input handling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pvt
from pvt.layers.blocks import Attention, Mlp, PatchEmbed

ALL = pvt.list_models()
V1 = pvt.list_models("pvt_[tsml]*")
V2 = pvt.list_models("pvt_v2_*")

# The issue's figures: exact params (M, 1000-class head) and the papers' GFLOPs (= GMACs) at 224.
PARAMS_M = {
    "pvt_tiny": 13.229, "pvt_small": 24.486, "pvt_medium": 44.208, "pvt_large": 61.369,
    "pvt_v2_b0": 3.667, "pvt_v2_b1": 14.009, "pvt_v2_b2": 25.363, "pvt_v2_b2_li": 22.554,
    "pvt_v2_b3": 45.239, "pvt_v2_b4": 62.556, "pvt_v2_b5": 81.956,
}  # fmt: skip
GMACS = {
    "pvt_tiny": 1.9, "pvt_small": 3.8, "pvt_medium": 6.7, "pvt_large": 9.8,
    "pvt_v2_b0": 0.6, "pvt_v2_b1": 2.1, "pvt_v2_b2": 4.0, "pvt_v2_b2_li": 3.9,
    "pvt_v2_b3": 6.9, "pvt_v2_b4": 10.1, "pvt_v2_b5": 11.8,
}  # fmt: skip


def test_registry_lists_every_published_variant() -> None:
    assert list(PARAMS_M) == ALL
    assert pvt.list_models("pvt_v2_b2*") == ["pvt_v2_b2", "pvt_v2_b2_li"]
    with pytest.raises(ValueError, match="unknown model 'pvt_v3'"):
        pvt.create_model("pvt_v3")


@pytest.mark.parametrize("name", ALL)
def test_param_count_matches_paper(name: str) -> None:
    model = pvt.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 3) == PARAMS_M[name]
    assert pvt.model_card(name).params_m == PARAMS_M[name]


@pytest.mark.parametrize("name", ALL)
def test_gmacs_at_224_match_paper(name: str) -> None:
    c = pvt.complexity(pvt.create_model(name))
    assert round(c.gmacs, 1) == GMACS[name] == pvt.model_card(name).paper_gmacs
    assert c.flops > 2 * c.macs * 0.9  # full count includes every matmul, 2 FLOPs each


def test_complexity_exact_values() -> None:
    # Counted-from-the-architecture values of the reference (3 decimals).
    assert round(pvt.complexity(pvt.create_model("pvt_small")).gmacs, 3) == 3.823
    assert round(pvt.complexity(pvt.create_model("pvt_v2_b2")).gmacs, 3) == 4.045
    assert round(pvt.complexity(pvt.create_model("pvt_v2_b2_li")).gmacs, 3) == 3.918


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_every_parameter_gets_gradient(name: str) -> None:
    model = pvt.create_model(name, num_classes=7).train()
    x = torch.randn(2, 3, 61, 47)  # odd, non-square
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} has an all-zero gradient"


@pytest.mark.parametrize("name", ALL)
def test_features_only_shapes_and_feature_info(name: str) -> None:
    model = pvt.create_model(name, features_only=True).eval()
    dims = model.embed_dims
    assert model.feature_info.channels() == list(dims)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, dims[0], 16, 24),
        (1, dims[1], 8, 12),
        (1, dims[2], 4, 6),
        (1, dims[3], 2, 3),
    ]
    assert not any(k.startswith(("head.", "cls_token", "norm.")) for k in model.state_dict())


def test_features_only_out_indices() -> None:
    model = pvt.create_model("pvt_v2_b0", features_only=True, out_indices=(1, 3))
    assert model.feature_info.channels() == [64, 256]
    assert model.feature_info.reduction() == [8, 32]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [64, 256]
    # Stages after the last requested one are not built, so every parameter is used.
    early = pvt.create_model("pvt_tiny", features_only=True, out_indices=(0, 1))
    assert not any(k.startswith(("block3", "block4", "patch_embed3", "pos_embed4")) for k in early.state_dict())
    sum(f.sum() for f in early(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in early.parameters())
    with pytest.raises(ValueError, match="out_indices"):
        pvt.create_model("pvt_v2_b0", features_only=True, out_indices=(4,))


@pytest.mark.parametrize(
    ("name", "size", "last"),
    [
        ("pvt_tiny", (448, 448), (14, 14)),  # crashes the official code (stage 2 has 3136 tokens)
        ("pvt_tiny", (225, 311), (7, 9)),
        ("pvt_tiny", (512, 1024), (16, 32)),
        ("pvt_v2_b0", (225, 311), (8, 10)),
        ("pvt_v2_b0", (29, 29), (1, 1)),
        ("pvt_v2_b2_li", (20, 33), (1, 2)),
    ],
)
def test_any_input_size(name: str, size: tuple[int, int], last: tuple[int, int]) -> None:
    model = pvt.create_model(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    assert tuple(feats[-1].shape[2:]) == last
    assert all(torch.isfinite(f).all() for f in feats)


def test_v1_position_table_resized_to_each_stage_grid() -> None:
    model = pvt.create_model("pvt_tiny")
    # At 448 stage 2 has 56x56 = 3136 tokens, the count the official code mistakes for "no resize".
    got = model._pos(1, (56, 56))
    table = model.pos_embed2.reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(56, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2))
    assert model._pos(0, (56, 56)) is model.pos_embed1  # own grid: no interpolation at all


@pytest.mark.parametrize(("name", "minimum"), [("pvt_small", 32), ("pvt_v2_b0", 29), ("pvt_v2_b2_li", 1)])
def test_minimum_input_size_and_clear_error_below(name: str, minimum: int) -> None:
    model = pvt.create_model(name).eval()
    assert model.min_input_size == minimum
    model(torch.randn(1, 3, minimum, minimum))
    if minimum > 1:
        with pytest.raises(ValueError, match=f"at least {minimum} pixels"):
            model(torch.randn(1, 3, minimum - 1, 64))


def test_wrong_channels_and_rank_give_clear_errors() -> None:
    model = pvt.create_model("pvt_v2_b0")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 64, 64))
    gray = pvt.create_model("pvt_v2_b0", in_chans=1)
    assert gray(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name", ALL)
def test_fused_attention_matches_plain_path(name: str) -> None:
    model = pvt.create_model(name).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attn(False)
        plain = model(x)
    assert all(not m.fused_attn for m in model.modules() if isinstance(m, Attention))
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li"])
def test_gradient_checkpointing_gives_same_output_and_grads(name: str) -> None:
    model = pvt.create_model(name).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b1"])
def test_forward_intermediates_and_head(name: str) -> None:
    model = pvt.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [f.shape[1] for f in feats] == list(model.embed_dims)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_head(final), model(x))
        assert model.forward_head(final, pre_logits=True).shape == (2, 512)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [f.shape[1] for f in last_two] == [320, 512]
        nhwc = model.forward_intermediates(x, indices=[0], stop_early=True, output_fmt="NHWC")[1]
        torch.testing.assert_close(nhwc[0], feats[0].permute(0, 2, 3, 1))


def test_reset_classifier() -> None:
    model = pvt.create_model("pvt_v2_b0")
    model.reset_classifier(10)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)
    assert isinstance(model.get_classifier(), nn.Identity)


def test_freeze_stages() -> None:
    model = pvt.create_model("pvt_tiny")
    model.freeze_stages(2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in model.named_parameters() if n.startswith(("patch_embed1", "patch_embed2", "block1.",
                                                                "block2.", "pos_embed1", "pos_embed2"))
    }  # fmt: skip
    model.train()
    assert not model.block1.training and not model.patch_embed2.training
    assert model.block3.training
    model.freeze_stages(0)
    assert all(p.requires_grad for p in model.parameters())


def test_no_weight_decay_names() -> None:
    assert pvt.create_model("pvt_tiny").no_weight_decay() == {
        "cls_token", "pos_embed1", "pos_embed2", "pos_embed3", "pos_embed4",
    }  # fmt: skip
    assert pvt.create_model("pvt_v2_b0").no_weight_decay() == set()


def test_official_names_shapes_and_norm_eps() -> None:
    v1 = pvt.create_model("pvt_small").state_dict()
    expect_v1 = {
        "patch_embed1.proj.weight": (64, 3, 4, 4),
        "patch_embed4.proj.weight": (512, 320, 2, 2),
        "pos_embed1": (1, 3136, 64),
        "pos_embed4": (1, 50, 512),
        "block1.0.attn.sr.weight": (64, 64, 8, 8),
        "block1.0.attn.kv.weight": (128, 64),
        "block3.5.mlp.fc1.weight": (1280, 320),
        "cls_token": (1, 1, 512),
        "norm.weight": (512,),
        "head.weight": (1000, 512),
    }
    assert {k: tuple(v1[k].shape) for k in expect_v1} == expect_v1
    assert "block4.0.attn.sr.weight" not in v1
    v2 = pvt.create_model("pvt_v2_b2").state_dict()
    assert tuple(v2["patch_embed1.proj.weight"].shape) == (64, 3, 7, 7)
    assert tuple(v2["patch_embed2.proj.weight"].shape) == (128, 64, 3, 3)
    assert tuple(v2["block1.0.mlp.dwconv.dwconv.weight"].shape) == (512, 1, 3, 3)
    assert "norm4.weight" in v2 and "block4.0.attn.sr.weight" not in v2
    li = pvt.create_model("pvt_v2_b2_li").state_dict()
    assert tuple(li["block4.0.attn.sr.weight"].shape) == (512, 512, 1, 1)

    model = pvt.create_model("pvt_v2_b2_li")
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            assert m.norm.eps == 1e-5
        if isinstance(m, Attention):
            assert m.norm is not None and m.norm.eps == 1e-5
        if isinstance(m, Mlp):
            assert isinstance(m.relu, nn.ReLU)  # b2_li's extra ReLU
    assert model.block1[0].norm1.eps == model.norm1.eps == 1e-6
    assert isinstance(pvt.create_model("pvt_v2_b2").block1[0].mlp.relu, nn.Identity)


def test_official_init() -> None:
    torch.manual_seed(0)
    v2 = pvt.create_model("pvt_v2_b2")
    w = v2.patch_embed1.proj.weight
    assert abs(w.std().item() - math.sqrt(2 / (7 * 7 * 64))) < 0.01
    assert v2.block1[0].mlp.fc1.bias.abs().max() == 0
    assert abs(v2.block1[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    v1 = pvt.create_model("pvt_tiny")
    # v1 keeps PyTorch's default conv init: uniform within 1/sqrt(fan_in).
    bound = 1 / math.sqrt(3 * 4 * 4)
    assert v1.patch_embed1.proj.weight.abs().max() <= bound
    assert abs(v1.pos_embed1.std().item() - 0.02) < 0.002


# Fixed-seed outputs catch silent numeric drift (recorded from this implementation).
EXPECTED = {
    "pvt_tiny": [0.56103, 0.49289, -0.01292, 0.59713],
    "pvt_v2_b0": [0.08247, 0.33959, 0.04219, 0.31216],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fixed_seed_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = pvt.create_model(name).eval()
    x = torch.linspace(-2, 2, 3 * 64 * 64).reshape(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)[0, :4]
    torch.testing.assert_close(out, torch.tensor(EXPECTED[name]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["pvt_small", "pvt_v2_b1", "pvt_v2_b2_li"])
def test_inference_view_path_matches_training_path(name: str) -> None:
    """Without autograd, tokens and images share memory (channels-last views); with it, NCHW
    copies. Same function either way, within fp32 rounding; feature maps come out contiguous."""
    model = pvt.create_model(name).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.enable_grad():
        train_path = model(x)
    with torch.inference_mode():
        view_path = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(view_path, train_path, rtol=0, atol=1e-5)
    assert all(f.is_contiguous() for f in feats)
