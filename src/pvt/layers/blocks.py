"""Layers shared by PVT v1 and v2.

Module and parameter names follow the authors' official code (``classification/pvt.py`` and
``pvt_v2.py``) so that an official state dict loads with no renaming. Tokens travel as
``[B, N, C]`` in row-major (``h * W + w``) order; convolutions see ``[B, C, H, W]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt.layers import fused

# Blocks and stage norms use eps 1e-6 (the official `norm_layer`); patch-embedding and
# spatial-reduction norms are plain `nn.LayerNorm`, i.e. eps 1e-5, in the official code.
# mmdetection's own PVT uses 1e-6 there too, so its checkpoints are built with
# `embed_norm_eps=MMDET_EMBED_NORM_EPS` (the models' keyword for these two norms).
BLOCK_NORM_EPS = 1e-6
EMBED_NORM_EPS = 1e-5
MMDET_EMBED_NORM_EPS = 1e-6


def exporting() -> bool:
    """Whether an exporter is tracing: ``torch.export`` (and the dynamo ONNX exporter built on it)
    or the TorchScript ONNX exporter. Code paths that only save time, or ops an exporter cannot
    express for every input size, step aside then."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def adaptive_avg_pool_matmul(x: Tensor, size: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` as two matrix products whose pooling windows are computed
    from the input's own height and width (PyTorch's window rule: ``floor(i * n / size)`` to
    ``ceil((i + 1) * n / size)``).

    Why: ONNX has no adaptive pooling; the exporters lower it to fixed windows worked out from the
    example's size, so an export with dynamic height / width would pool wrong (or index out of
    range) at any other size. Agrees with the pooling op within float rounding (1e-6).
    """

    def windows(n: int) -> Tensor:
        i = torch.arange(size, device=x.device)
        start = (i * n) // size
        end = ((i + 1) * n + size - 1) // size
        j = torch.arange(n, device=x.device)
        inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
        return inside.to(x.dtype) / (end - start)[:, None].to(x.dtype)  # [size, n]

    h, w = x.shape[-2], x.shape[-1]
    return windows(h) @ x @ windows(w).transpose(0, 1)


def tokens_to_image(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """``[B, H*W, C]`` -> ``[B, C, H, W]``.

    Without autograd (inference) this is a *view*: row-major tokens are already ``[B, H, W, C]``
    in memory, i.e. a channels-last image, which oneDNN's convolutions take without a copy. With
    autograd the contiguous NCHW copy is kept: measured faster for training on CPU, where the
    channels-last backward passes cost more than the copies they save.
    """
    b, _, c = x.shape
    if torch.is_grad_enabled():
        return x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
    return x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)


def image_to_tokens(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``; free for a channels-last image (what the convolutions
    return for channels-last input), one copy otherwise."""
    if torch.is_grad_enabled():  # training: the strided view the layers have always been trained on
        return x.flatten(2).transpose(1, 2)
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole residual branch)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Patch embedding: a strided conv, then LayerNorm over channels.

    v1 uses non-overlapping patches (kernel = stride = p, no padding); v2 overlapping ones
    (kernel 7 stride 4 for stage 1, kernel 3 stride 2 after, padding kernel // 2).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        patch_size: int,
        stride: int,
        padding: int = 0,
        *,
        norm_eps: float = EMBED_NORM_EPS,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.padding = padding
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Grid size this embedding produces from an ``h x w`` input (conv arithmetic)."""
        k, s, p = self.patch_size, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[B, C_in, H, W]`` -> ``([B, h*w, C], (h, w))``."""
        # Inference: channels-last in, channels-last out, so the tokens are a view of the conv's
        # output (see tokens_to_image for why training keeps NCHW).
        if not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        x = fused.conv2d(x, self.proj) if fused.usable(self, x) else self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(image_to_tokens(x)), hw


class Attention(nn.Module):
    """Spatial-reduction attention (SRA), or v2's linear SRA when ``linear=True``.

    Keys and values come from a reduced token set: a ``sr_ratio`` strided conv (SRA), or a
    7x7 adaptive average pool and 1x1 conv (linear SRA, any input size gives 49 keys).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
        linear: bool = False,
        fused_attn: bool = True,
        norm_eps: float = EMBED_NORM_EPS,
    ) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.linear = linear
        # Plain softmax path kept for checking; fused SDPA is the default.
        self.fused_attn = fused_attn

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        self.pool: nn.Module | None = None
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        self.act: nn.Module | None = None
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def kv_grid(self, h: int, w: int) -> tuple[int, int]:
        """Grid of the reduced key/value tokens for an ``h x w`` query grid."""
        if self.linear:
            return 7, 7
        if self.sr_ratio > 1:
            return h // self.sr_ratio, w // self.sr_ratio
        return h, w

    def _reduce(self, x: Tensor, hw: tuple[int, int], use_fused: bool = False) -> Tensor:
        """``[B, N, C]`` -> reduced ``[B, N', C]`` key/value source."""
        if self.sr is None:
            return x
        x_ = tokens_to_image(x, hw)
        if self.pool is not None:
            x_ = adaptive_avg_pool_matmul(x_, 7) if torch.onnx.is_in_onnx_export() else self.pool(x_)
        x_ = image_to_tokens(fused.conv2d(x_, self.sr) if use_fused else self.sr(x_))
        assert self.norm is not None
        x_ = self.norm(x_)
        if self.act is not None:
            x_ = self.act(x_)
        return x_

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``; ``hw`` is the token grid (N may add a cls token)."""
        out = self._attend(self.q(x), self.kv(self._reduce(x, hw)))
        return self.proj_drop(self.proj(out))

    def forward_fused(self, x: Tensor, hw: tuple[int, int], residual: Tensor) -> Tensor:
        """``residual + forward(x, hw)`` with fused kernels (inference; see ``pvt.layers.fused``)."""
        out = self._attend(fused.linear(x, self.q), fused.linear(self._reduce(x, hw, use_fused=True), self.kv))
        return fused.linear_add(out, self.proj, residual)

    def _attend(self, q: Tensor, kv: Tensor) -> Tensor:
        """Queries ``[B, N, C]`` over keys and values ``[B, N', 2C]`` -> ``[B, N, C]``."""
        b, n, _ = q.shape
        q = q.reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        # Rows [0:C] of kv.weight are K and [C:2C] V, each split head-major (official layout).
        kv = kv.reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each [B, heads, N', d]

        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            # Softmax in fp32: under fp16 autocast the logits would overflow.
            attn = self.attn_drop(attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype))
            out = attn @ v
        return out.transpose(1, 2).reshape(b, n, self.dim)


class DWConv(nn.Module):
    """3x3 depthwise conv on tokens (v2's ConvFFN); nested to keep the key ``dwconv.dwconv``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        return image_to_tokens(self.dwconv(tokens_to_image(x, hw)))


class Mlp(nn.Module):
    """v1 MLP (fc1, GELU, fc2) or v2 ConvFFN (fc1, [ReLU if linear], DWConv, GELU, fc2)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        drop: float = 0.0,
        dwconv: bool = False,
        linear: bool = False,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        # b2_li's extra ReLU is in the official code though not in the paper.
        self.relu: nn.Module = nn.ReLU(inplace=True) if linear else nn.Identity()
        self.dwconv = DWConv(hidden_features) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.relu(self.fc1(x))
        if self.dwconv is not None:
            x = self.dwconv(x, hw)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))

    def forward_fused(self, x: Tensor, hw: tuple[int, int], residual: Tensor) -> Tensor:
        """``residual + forward(x, hw)`` with fused kernels (inference; see ``pvt.layers.fused``):
        the activation runs in the epilogue of fc1 (v1) or of the depthwise conv (v2)."""
        linear = isinstance(self.relu, nn.ReLU)
        if self.dwconv is not None:
            x = fused.linear(x, self.fc1, "relu" if linear else "none")
            x = image_to_tokens(fused.conv2d(tokens_to_image(x, hw), self.dwconv.dwconv, "gelu"))
        elif linear:
            x = self.act(fused.linear(x, self.fc1, "relu"))
        else:
            x = fused.linear(x, self.fc1, "gelu")
        return fused.linear_add(x, self.fc2, residual)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        sr_ratio: int = 1,
        linear: bool = False,
        dwconv: bool = False,
        fused_attn: bool = True,
        sr_norm_eps: float = EMBED_NORM_EPS,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            sr_ratio=sr_ratio,
            linear=linear,
            fused_attn=fused_attn,
            norm_eps=sr_norm_eps,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, dwconv=dwconv, linear=linear)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""
        if fused.usable(self, x):  # eval-mode CPU inference: same maths, fewer memory passes
            x = self.attn.forward_fused(self.norm1(x), hw, x)
            return self.mlp.forward_fused(self.norm2(x), hw, x)
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        x = x + self.drop_path(self.mlp(self.norm2(x), hw))
        return x


def init_linear_and_norm(m: nn.Module) -> None:
    """Official init shared by v1 and v2: trunc-normal(0.02) linears, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_conv_fan_out(m: nn.Module) -> None:
    """v2's conv init: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out // groups."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def drop_path_rates(drop_path_rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    """Per-block rates, linear in block index across all stages (official rule)."""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    out, start = [], 0
    for d in depths:
        out.append(rates[start : start + d])
        start += d
    return out


def resize_pos_embed(pos: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of ``[1, h*w, C]`` to ``[1, H*W, C]``."""
    # Under an exporter the grid is symbolic: the shortcut would fix the exported file to one
    # input size (a resize to the same grid is exact, so the result is the same).
    if not exporting() and src_grid == dst_grid:
        return pos
    c = pos.shape[-1]
    grid = pos.reshape(1, src_grid[0], src_grid[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst_grid, mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)
