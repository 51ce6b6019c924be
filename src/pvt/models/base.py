"""The backbone contract shared by every PVT: stages, features, head, freezing, checkpointing.

Subclasses (v1 in ``pvt_v1.py``, v2 in ``pvt_v2.py``) own their parameters under the official
names and implement three things: ``_stage`` (one stage's forward), ``_pool`` (features ->
pooled vector) and ``stage_grid`` (input size -> grid per stage, used for the minimum size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pvt.layers import fused
from pvt.layers.blocks import Attention, Block


@dataclass(frozen=True)
class FeatureStage:
    """One feature map a backbone can return."""

    num_chs: int
    reduction: int
    module: str
    index: int


class FeatureInfo(list[FeatureStage]):
    """Channels and strides of the returned maps, timm style (``channels()``, ``reduction()``)."""

    def channels(self) -> list[int]:
        return [f.num_chs for f in self]

    def reduction(self) -> list[int]:
        return [f.reduction for f in self]

    def module_name(self) -> list[str]:
        return [f.module for f in self]


class PyramidBackbone(nn.Module):
    """Common forward logic for v1 and v2. Not instantiated directly."""

    num_stages = 4
    arch: str | None = None  # registered name, set by create_model
    load_report: object | None = None  # pvt.checkpoint.LoadReport of the weights it was built with
    pretrained_source: object | None = None  # pvt.hub.WeightsSource of create_model(pretrained=...)
    head: nn.Module

    def __init__(
        self,
        *,
        in_chans: int,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
        features_only: bool,
        out_indices: Sequence[int],
        drop_rate: float,
    ) -> None:
        super().__init__()
        if len(embed_dims) != self.num_stages or len(depths) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} stages, got dims {embed_dims}, depths {depths}")
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(i < 0 or i >= self.num_stages for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..3, got {out_indices}")
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.features_only = features_only
        self.out_indices = tuple(sorted(set(out_indices)))
        # A features-only model builds no stage after the last one it returns (as timm does), so
        # every parameter it has gets a gradient (DDP needs no find_unused_parameters).
        self.num_built = max(self.out_indices) + 1 if features_only else self.num_stages
        self.num_classes = 0 if features_only else num_classes
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.grad_checkpointing = False
        self.frozen_stages = 0
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        all_stages = [FeatureStage(c, 4 * 2**i, f"block{i + 1}", i) for i, c in enumerate(self.embed_dims)]
        self.feature_info = FeatureInfo(f for f in all_stages if not features_only or f.index in self.out_indices)

    # -- what subclasses provide ------------------------------------------------------------

    def _stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i`` (0-based): ``[B, C_in, H, W]`` -> ``[B, C_i, h, w]``."""
        raise NotImplementedError

    def _last_stage_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Classification path of the last stage: ``(features for forward_head, NCHW map)``."""
        raise NotImplementedError

    def _pool(self, x: Tensor) -> Tensor:
        """Output of ``forward_features`` -> ``[B, C4]``."""
        raise NotImplementedError

    def stage_grid(self, h: int, w: int) -> list[tuple[int, int]]:
        """Token grid of each stage for an ``h x w`` input."""
        raise NotImplementedError

    # -- helpers shared by subclasses -------------------------------------------------------

    def _blocks(self, blocks: nn.ModuleList, x: Tensor, hw: tuple[int, int]) -> Tensor:
        for blk in blocks:
            use_ckpt = self.grad_checkpointing and self.training
            x = checkpoint(blk, x, hw, use_reentrant=False) if use_ckpt else blk(x, hw)
        return x

    def _kv_grids_ok(self, grids: list[tuple[int, int]]) -> bool:
        for i, (h, w) in enumerate(grids):
            if h < 1 or w < 1:
                return False
            attn = self._stage_blocks(i)[0].attn
            assert isinstance(attn, Attention)
            kh, kw = attn.kv_grid(h, w)
            if kh < 1 or kw < 1:
                return False
        return True

    def _stage_blocks(self, i: int) -> nn.ModuleList:
        blocks = getattr(self, f"block{i + 1}")
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    @property
    def min_input_size(self) -> int:
        """Smallest side length (pixels) every stage and its spatial reduction can handle."""
        for s in range(1, 257):
            if self._kv_grids_ok(self.stage_grid(s, s)):
                return s
        raise RuntimeError("no valid input size up to 256")

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
                f"convert the images or build the model with in_chans={x.shape[1]}"
            )
        h, w = x.shape[2], x.shape[3]
        if not self._kv_grids_ok(self.stage_grid(h, w)):
            m = self.min_input_size
            raise ValueError(
                f"input {h}x{w} is too small for {type(self).__name__}: each side must be at least "
                f"{m} pixels; resize or pad the image"
            )

    # -- the contract -----------------------------------------------------------------------

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Feature maps of the chosen stages (``[B, C_i, H/s_i, W/s_i]``), and the final features.

        ``indices``: stage indices, or an int n for the last n stages (default: all four).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if indices is None:
            take = list(range(self.num_built))
        elif isinstance(indices, int):
            take = list(range(self.num_built - indices, self.num_built))
        else:
            take = sorted(int(i) for i in indices)
        if not take or any(i < 0 or i >= self.num_built for i in take):
            raise ValueError(f"stage indices must lie in 0..{self.num_built - 1}, got {take}")
        self._check_input(x)
        last = max(take) if (stop_early or intermediates_only) else self.num_built - 1
        feats: list[Tensor] = []
        final = x
        for i in range(last + 1):
            if i == self.num_stages - 1 and not self.features_only:
                final, fmap = self._last_stage_tokens(x)
            else:
                x = fmap = self._stage(i, x)
                final = fmap
            if i in take:
                # Stages hand each other channels-last views; callers get standard NCHW (or NHWC).
                feats.append(fmap.permute(0, 2, 3, 1) if output_fmt == "NHWC" else fmap.contiguous())
        if intermediates_only:
            return feats
        return final, feats

    def forward_features(self, x: Tensor) -> Tensor:
        """Image -> features before pooling (v1: normed tokens ``[B, 1+N, C]``; v2: ``[B, C, h, w]``)."""
        if self.features_only:
            raise RuntimeError("forward_features needs the classification model; use forward()")
        self._check_input(x)
        for i in range(self.num_stages - 1):
            x = self._stage(i, x)
        return self._last_stage_tokens(x)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features -> ``[B, num_classes]`` logits, or the pooled ``[B, C4]`` if ``pre_logits``."""
        x = self.head_drop(self._pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:  # type: ignore[override]
        if self.features_only:
            out = self.forward_intermediates(x, self.out_indices, intermediates_only=True)
            assert isinstance(out, list)
            return out
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh ``num_classes`` one (0 gives an identity head)."""
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward to save activation memory."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (beyond norms and biases)."""
        return {n for n, _ in self.named_parameters() if n.startswith(("pos_embed", "cls_token"))}

    def stage_modules(self, i: int) -> Iterator[nn.Module]:
        """The modules that make up stage ``i`` (patch embedding, blocks, stage norm)."""
        for name in (f"patch_embed{i + 1}", f"block{i + 1}", f"norm{i + 1}", f"pos_drop{i + 1}"):
            m = getattr(self, name, None)
            if isinstance(m, nn.Module):
                yield m

    def stage_parameters(self, i: int) -> Iterator[nn.Parameter]:
        for m in self.stage_modules(i):
            yield from m.parameters()
        pos = getattr(self, f"pos_embed{i + 1}", None)
        if isinstance(pos, nn.Parameter):
            yield pos

    def freeze_stages(self, num_stages: int) -> None:
        """Freeze the first ``num_stages`` stages: no gradients, and kept in eval mode."""
        if not 0 <= num_stages <= self.num_built:
            raise ValueError(f"num_stages must be in 0..{self.num_built}, got {num_stages}")
        self.frozen_stages = num_stages
        for i in range(self.num_built):
            for p in self.stage_parameters(i):
                p.requires_grad_(i >= num_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> PyramidBackbone:
        super().train(mode)
        fused.release(self)  # eval() starts from the weights as they are now (see pvt.layers.fused)
        for i in range(self.frozen_stages):
            for m in self.stage_modules(i):
                m.eval()
        return self

    def set_fused_attn(self, enable: bool = True) -> None:
        """Switch every attention between fused SDPA and the plain softmax path."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_attn = enable

    def blocks(self) -> Iterator[Block]:
        for i in range(self.num_built):
            for blk in self._stage_blocks(i):
                assert isinstance(blk, Block)
                yield blk
