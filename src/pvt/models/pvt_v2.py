"""PVT v2 (arXiv 2106.13797): overlapping patch embedding, ConvFFN, (linear) SRA, no position table.

Exactly the official ``classification/pvt_v2.py`` architecture and state-dict names.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn

from pvt.layers.blocks import (
    BLOCK_NORM_EPS,
    EMBED_NORM_EPS,
    Block,
    PatchEmbed,
    drop_path_rates,
    init_conv_fan_out,
    init_linear_and_norm,
    tokens_to_image,
)
from pvt.models.base import PyramidBackbone
from pvt.models.registry import ModelCard, register_model


class PyramidVisionTransformerV2(PyramidBackbone):
    """PVT v2. Classification: ``[B, 3, H, W]`` -> ``[B, num_classes]`` (global average pool).

    With ``features_only=True``: a list of normed ``[B, C_i, ceil(H/s_i), ceil(W/s_i)]`` maps
    (strides 4, 8, 16, 32) for ``out_indices``, and no head.
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        linear: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        fused_attn: bool = True,
        embed_norm_eps: float = EMBED_NORM_EPS,
    ) -> None:
        super().__init__(
            in_chans=in_chans,
            embed_dims=embed_dims,
            depths=depths,
            num_classes=num_classes,
            features_only=features_only,
            out_indices=out_indices,
            drop_rate=drop_rate,
        )
        self.linear = linear
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        prev = in_chans
        for i in range(self.num_built):
            k, s = (7, 4) if i == 0 else (3, 2)
            dim = embed_dims[i]
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(prev, dim, k, s, padding=k // 2, norm_eps=embed_norm_eps))
            blocks = [
                Block(
                    dim,
                    num_heads[i],
                    mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i][j],
                    sr_ratio=sr_ratios[i],
                    linear=linear,
                    dwconv=True,
                    fused_attn=fused_attn,
                    sr_norm_eps=embed_norm_eps,
                )
                for j in range(depths[i])
            ]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            prev = dim
        if not features_only:
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)
        self.apply(init_conv_fan_out)

    def stage_grid(self, h: int, w: int) -> list[tuple[int, int]]:
        grids = []
        for i in range(self.num_built):
            h, w = getattr(self, f"patch_embed{i + 1}").output_size(h, w)
            grids.append((h, w))
        return grids

    def _stage(self, i: int, x: Tensor) -> Tensor:
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        x = self._blocks(self._stage_blocks(i), x, hw)
        x = getattr(self, f"norm{i + 1}")(x)
        return tokens_to_image(x, hw)  # [B, C, h, w], a channels-last view

    def _last_stage_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fmap = self._stage(self.num_stages - 1, x)
        return fmap, fmap

    def _pool(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


_B0 = dict(embed_dims=(32, 64, 160, 256))
V2_VARIANTS: dict[str, dict[str, object]] = {
    "pvt_v2_b0": dict(_B0, depths=(2, 2, 2, 2)),
    "pvt_v2_b1": dict(depths=(2, 2, 2, 2)),
    "pvt_v2_b2": dict(depths=(3, 4, 6, 3)),
    "pvt_v2_b2_li": dict(depths=(3, 4, 6, 3), linear=True),
    "pvt_v2_b3": dict(depths=(3, 4, 18, 3)),
    "pvt_v2_b4": dict(depths=(3, 8, 27, 3)),
    "pvt_v2_b5": dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}


# Published card (see pvt_v1.py). b0/b1 paper params (3.4 / 13.1 M) exclude the head; the
# official classification README's 3.7 / 14.0 M include it, as our counts do.
_CARDS = [
    ModelCard("pvt_v2_b0", "v2", 3.667, 3.7, 0.6, 70.5, 0.1, None),
    ModelCard("pvt_v2_b1", "v2", 14.009, 14.0, 2.1, 78.7, 0.1, None),
    ModelCard("pvt_v2_b2", "v2", 25.363, 25.4, 4.0, 82.0, 0.1, None),
    ModelCard("pvt_v2_b2_li", "v2", 22.554, 22.6, 3.9, 82.1, 0.1, None),
    ModelCard("pvt_v2_b3", "v2", 45.239, 45.2, 6.9, 83.2, 0.3, 1.0),
    ModelCard("pvt_v2_b4", "v2", 62.556, 62.6, 10.1, 83.6, 0.3, 1.0),
    ModelCard("pvt_v2_b5", "v2", 81.956, 82.0, 11.8, 83.8, 0.3, 1.0),
]


def build_pvt_v2(name: str, **kwargs: object) -> PyramidVisionTransformerV2:
    cfg = dict(V2_VARIANTS[name])
    cfg.update(kwargs)
    return PyramidVisionTransformerV2(**cfg)  # type: ignore[arg-type]


for _card in _CARDS:
    register_model(_card, partial(build_pvt_v2, _card.name))
