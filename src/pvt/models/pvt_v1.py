"""PVT v1 (arXiv 2102.12122): non-overlapping patches, learned position embeddings, SRA.

Exactly the official ``classification/pvt.py`` architecture and state-dict names, except that
position embeddings are resized to each stage's own grid (the official code compares every stage
with stage 1's 3136 tokens and so crashes on, for example, 448x448 inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from pvt.layers.blocks import (
    BLOCK_NORM_EPS,
    EMBED_NORM_EPS,
    Block,
    PatchEmbed,
    drop_path_rates,
    init_linear_and_norm,
    resize_pos_embed,
    tokens_to_image,
)
from pvt.models.base import PyramidBackbone
from pvt.models.registry import ModelCard, register_model


class PyramidVisionTransformer(PyramidBackbone):
    """PVT v1. Classification: ``[B, 3, H, W]`` -> ``[B, num_classes]``.

    With ``features_only=True``: a list of ``[B, C_i, H/s_i, W/s_i]`` maps (strides 4, 8, 16, 32)
    for ``out_indices``; there is then no cls token, final norm or head (as in the official
    detection backbone), and the last stage's position embedding keeps its unused cls slot so
    official checkpoints of either kind load as they are.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
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
        self.img_size = img_size
        self.pos_grids: list[tuple[int, int]] = []
        dpr = drop_path_rates(drop_path_rate, tuple(depths))
        prev = in_chans
        for i in range(self.num_built):
            patch = 4 if i == 0 else 2
            grid = img_size // (4 * 2**i)
            self.pos_grids.append((grid, grid))
            dim = embed_dims[i]
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(prev, dim, patch, patch, norm_eps=embed_norm_eps))
            # The last stage's table has a leading cls slot: [1, 1 + grid^2, C].
            extra = 1 if i == self.num_stages - 1 else 0
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid * grid + extra, dim)))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(drop_rate))
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
                    fused_attn=fused_attn,
                    sr_norm_eps=embed_norm_eps,
                )
                for j in range(depths[i])
            ]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            prev = dim

        if not features_only:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
            self.norm = nn.LayerNorm(embed_dims[-1], eps=BLOCK_NORM_EPS)
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # Official v1 init: convs keep PyTorch's default; linears, norms, tables as below.
        for i in range(self.num_built):
            nn.init.trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        if not self.features_only:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)

    def stage_grid(self, h: int, w: int) -> list[tuple[int, int]]:
        grids = []
        for i in range(self.num_built):
            pe = getattr(self, f"patch_embed{i + 1}")
            h, w = pe.output_size(h, w)
            grids.append((h, w))
        return grids

    def _pos(self, i: int, hw: tuple[int, int]) -> Tensor:
        """Stage ``i``'s position embedding for grid ``hw`` (patch slots only)."""
        pos = getattr(self, f"pos_embed{i + 1}")
        if i == self.num_stages - 1:
            pos = pos[:, 1:]
        return resize_pos_embed(pos, self.pos_grids[i], hw)

    def _embed(self, i: int, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x, hw = getattr(self, f"patch_embed{i + 1}")(x)
        return x, hw

    def _stage(self, i: int, x: Tensor) -> Tensor:
        x, hw = self._embed(i, x)
        x = getattr(self, f"pos_drop{i + 1}")(x + self._pos(i, hw))
        x = self._blocks(self._stage_blocks(i), x, hw)
        return tokens_to_image(x, hw)  # [B, C, h, w], a channels-last view

    def _last_stage_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        i = self.num_stages - 1
        x, hw = self._embed(i, x)
        b = x.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)  # [B, 1 + h*w, C]
        table = getattr(self, "pos_embed4")  # noqa: B009 (registered by name in __init__)
        pos = torch.cat((table[:, :1], self._pos(i, hw)), dim=1)
        x = getattr(self, "pos_drop4")(x + pos)  # noqa: B009
        x = self._blocks(self._stage_blocks(i), x, hw)
        fmap = tokens_to_image(x[:, 1:], hw)
        return self.norm(x), fmap

    def _pool(self, x: Tensor) -> Tensor:
        return x[:, 0]  # cls token


# The variants: depths from the official code (the paper's Table 1 misprints stage 2).
V1_VARIANTS: dict[str, dict[str, object]] = {
    "pvt_tiny": dict(depths=(2, 2, 2, 2)),
    "pvt_small": dict(depths=(3, 4, 6, 3)),
    "pvt_medium": dict(depths=(3, 4, 18, 3)),
    "pvt_large": dict(depths=(3, 8, 27, 3)),
}

# Published card: exact params with the 1000-class head, paper params / GFLOPs(=GMACs) / top-1,
# and the ImageNet recipe's drop path and gradient clipping.
_CARDS = [
    ModelCard("pvt_tiny", "v1", 13.229, 13.2, 1.9, 75.1, 0.1, None),
    ModelCard("pvt_small", "v1", 24.486, 24.5, 3.8, 79.8, 0.1, None),
    ModelCard("pvt_medium", "v1", 44.208, 44.2, 6.7, 81.2, 0.3, 1.0),
    ModelCard("pvt_large", "v1", 61.369, 61.4, 9.8, 81.7, 0.3, 1.0),
]


def build_pvt_v1(name: str, **kwargs: object) -> PyramidVisionTransformer:
    cfg = dict(V1_VARIANTS[name])
    cfg.update(kwargs)
    return PyramidVisionTransformer(**cfg)  # type: ignore[arg-type]


for _card in _CARDS:
    register_model(_card, partial(build_pvt_v1, _card.name))
