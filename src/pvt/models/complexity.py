"""Parameter and operation counts under the PVT papers' convention, for any model of this package.

The papers' "GFLOPs" come from mmcv's ``get_model_complexity_info`` plus an explicit attention
term, and are really multiply-accumulates (GMACs):

* Conv2d: one MAC per kernel tap per output element, plus one per output for the bias;
* Linear: one MAC per weight per token, bias not counted;
* LayerNorm / BatchNorm / GroupNorm: 2 per element (1 without affine);
* ReLU-family activations: 1 per output element; pooling: 1 per input element; Upsample: 1 per
  output element; GELU, softmax and matmuls outside Linear are not counted;
* attention (added by the PVT authors): ``2 * h * w * h' * w' * C`` per block, ``h x w`` the stage
  grid and ``h' x w'`` the reduced key grid (7x7 for linear SRA).

``flops`` is the full count instead: 2 FLOPs per multiply-accumulate of every convolution, linear
layer and attention matmul (``q @ k^T`` and ``attn @ v`` over all tokens, cls included), plus
bias adds; element-wise work (norms, activations, softmax) is left out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pvt.layers.blocks import Attention

_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)
_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU)
_POOLS = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


@dataclass
class Complexity:
    """Counts for one forward pass at ``input_size``."""

    input_size: tuple[int, ...]
    params: int
    macs: int  # papers' convention (their "FLOPs")
    flops: int  # full count, 2 per MAC, every matmul
    macs_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def __str__(self) -> str:
        size = "x".join(str(s) for s in self.input_size)
        return (
            f"input {size}: {self.params_m:.3f} M params, {self.gmacs:.3f} GMACs (papers' GFLOPs), "
            f"{self.gflops:.3f} GFLOPs (full)"
        )


def _conv_counts(m: nn.Conv2d, out: Tensor) -> tuple[int, int]:
    taps = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    n = out.numel()
    bias = n if m.bias is not None else 0
    return n * taps + bias, 2 * n * taps + bias


def _linear_counts(m: nn.Linear, inp: Tensor, out: Tensor) -> tuple[int, int]:
    macs = inp.numel() * m.out_features
    return macs, 2 * macs + (out.numel() if m.bias is not None else 0)


def _attention_counts(m: Attention, x: Tensor, hw: tuple[int, int]) -> tuple[int, int]:
    h, w = hw
    kh, kw = m.kv_grid(h, w)
    b, n, c = x.shape
    paper = b * 2 * h * w * kh * kw * c
    full = b * 2 * 2 * n * kh * kw * c  # two matmuls, 2 FLOPs per MAC, every query token
    return paper, full


def complexity(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    *,
    batch_size: int = 1,
) -> Complexity:
    """Count params, papers' GMACs and full GFLOPs of ``model`` on one ``input_size`` image."""
    macs: dict[str, int] = defaultdict(int)
    flops = 0

    def add(kind: str, m_count: int, f_count: int) -> None:
        nonlocal flops
        macs[kind] += m_count
        flops += f_count

    def hook(m: nn.Module, args: tuple[object, ...], out: object) -> None:
        inp = args[0] if args and isinstance(args[0], Tensor) else None
        if isinstance(m, Attention):
            assert isinstance(inp, Tensor)
            add("attention", *_attention_counts(m, inp, args[1]))  # type: ignore[arg-type]
        elif not isinstance(out, Tensor):
            return
        elif isinstance(m, nn.Conv2d):
            add("conv", *_conv_counts(m, out))
        elif isinstance(m, nn.Linear) and inp is not None:
            add("linear", *_linear_counts(m, inp, out))
        elif isinstance(m, _NORMS) and inp is not None:
            affine = getattr(m, "elementwise_affine", None) or getattr(m, "affine", False)
            add("norm", inp.numel() * (2 if affine else 1), 0)
        elif isinstance(m, _ACTS):
            add("activation", out.numel(), 0)
        elif isinstance(m, _POOLS) and inp is not None:
            add("pool", inp.numel(), 0)
        elif isinstance(m, nn.Upsample):
            add("upsample", out.numel(), 0)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(
            batch_size,
            *input_size,
            device=p.device if p is not None else "cpu",
            dtype=p.dtype if p is not None else torch.float32,
        )
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return Complexity(tuple(input_size), params, sum(macs.values()), flops, dict(macs))
