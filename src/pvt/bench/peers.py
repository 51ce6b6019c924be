"""The peers' PVT implementations (timm, HF transformers) built as twins of ours, same weights.

Used by the parity tests and the benchmarks: a peer model is created with its own random init,
its state dict goes through our converter into our model, and :func:`check_twins` confirms the
two compute the same function before anything is compared. Needs the ``peers`` extra.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pvt.layers.blocks import Attention, PatchEmbed
from pvt.models import PyramidBackbone, create_model
from pvt.models.pvt_v1 import V1_VARIANTS
from pvt.models.pvt_v2 import V2_VARIANTS


def hf_v1_config(name: str, **kw: Any) -> Any:
    """HF ``PvtConfig`` of one of our v1 variants."""
    import transformers

    return transformers.PvtConfig(
        depths=list(V1_VARIANTS[name]["depths"]),  # type: ignore[call-overload]
        hidden_sizes=[64, 128, 320, 512],
        num_attention_heads=[1, 2, 5, 8],
        mlp_ratios=[8, 8, 4, 4],
        sequence_reduction_ratios=[8, 4, 2, 1],
        **kw,
    )


def hf_v2_config(name: str, **kw: Any) -> Any:
    """HF ``PvtV2Config`` of one of our v2 variants."""
    import transformers

    cfg: dict[str, Any] = V2_VARIANTS[name]
    return transformers.PvtV2Config(
        depths=list(cfg["depths"]),
        hidden_sizes=list(cfg.get("embed_dims", (64, 128, 320, 512))),
        mlp_ratios=list(cfg.get("mlp_ratios", (8, 8, 4, 4))),
        linear_attention=bool(cfg.get("linear", False)),
        **kw,
    )


def match_hf_eps_(model: PyramidBackbone) -> PyramidBackbone:
    """HF uses LayerNorm eps 1e-6 everywhere; the official code (and we) 1e-5 in the
    patch-embedding and spatial-reduction norms. Match HF for a comparison, not in the model."""
    for m in model.modules():
        if isinstance(m, PatchEmbed):
            m.norm.eps = 1e-6
        if isinstance(m, Attention) and m.norm is not None:
            m.norm.eps = 1e-6
    return model


class TimmFeatures(nn.Module):
    """timm's multi-scale output (``forward_intermediates``) as a module returning the 4 maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, intermediates_only=True)  # type: ignore[operator,no-any-return]


def timm_twins(name: str, *, features_only: bool = False) -> tuple[nn.Module, nn.Module]:
    """(ours, timm's ``pvt_v2_*``) with the same weights; with ``features_only`` both return the
    four stride-4..32 maps."""
    import timm

    peer = timm.create_model(name, pretrained=False)
    ours = create_model(name, features_only=features_only, checkpoint=peer.state_dict())
    return ours.eval(), (TimmFeatures(peer) if features_only else peer).eval()


def hf_twins(name: str, *, backbone: bool = False) -> tuple[nn.Module, nn.Module]:
    """(ours, HF ``PvtForImageClassification`` / ``PvtV2ForImageClassification``, or with
    ``backbone`` HF's ``PvtV2Backbone``) with the same weights."""
    import transformers

    if name in V1_VARIANTS:
        peer: nn.Module = transformers.PvtForImageClassification(hf_v1_config(name, num_labels=1000))
    elif backbone:
        stages = ["stage1", "stage2", "stage3", "stage4"]
        peer = transformers.PvtV2Backbone(hf_v2_config(name, out_features=stages))
    else:
        peer = transformers.PvtV2ForImageClassification(hf_v2_config(name, num_labels=1000))
    ours = match_hf_eps_(create_model(name, features_only=backbone, checkpoint=peer.state_dict()))
    return ours.eval(), peer.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A model's output as a list of tensors, whatever its wrapper (HF output objects, dicts)."""
    out = model(x)
    if hasattr(out, "logits"):
        out = out.logits
    elif hasattr(out, "feature_maps"):
        out = out.feature_maps
    if isinstance(out, dict):
        out = list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


@torch.inference_mode()
def check_twins(a: nn.Module, b: nn.Module, x: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |difference| of the two models' outputs on ``x``; raises if above ``atol``."""
    diff = max(float((p - q).abs().max()) for p, q in zip(outputs(a, x), outputs(b, x), strict=True))
    if diff > atol:
        raise AssertionError(f"the twins disagree by {diff:.2e} (> {atol}): not the same weights")
    return diff
