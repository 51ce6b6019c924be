"""Fused oneDNN kernels for CPU inference: linear / conv with the bias, activation or residual add
done in the kernel's epilogue (the ops ``torch.compile`` itself emits on CPU).

Why: profiled at batch 16, a PVT v2 spends ~13% of its CPU time broadcasting biases into
``addmm``'s output and ~12% in a separate GELU pass over the widest tensor of every block (the
4x-expanded hidden layer); the fused kernels write each output once. Numerics are those of the
plain ops (same GEMM; erf GELU), checked against them in the tests.

Weights are handed to oneDNN prepacked in its blocked layout (what ``torch.compile``'s freezing
does): unpacked, oneDNN reorders every weight on every call, which measured up to 2x the GEMM
itself for the wide-K layers (fc2) at batch 1. The packed copy costs the weight's size in memory
once; it is refreshed when the weight changes through a tracked op (``load_state_dict``, optimizer
steps, in-place ops under ``no_grad``, ``.to()``) and dropped by ``release`` and by the models'
``train()`` / ``eval()`` (an edit through ``.data``, which torch does not track, is seen after them).

Used only where nothing can notice the difference: CPU, fp32 (or bf16 weights and inputs where
oneDNN has bf16 in hardware), no autograd, eval mode, no autocast, not while ``torch.compile``,
``torch.export``, ``torch.onnx.export`` or ``torch.jit.trace`` traces (the compiler fuses on its
own; exporters want standard ops), and no forward hooks on the modules involved (``pvt.complexity``
and user hooks see every layer run as a module).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.utils.weak import WeakTensorKeyDictionary


def _ops_available() -> bool:
    try:
        ops = ("_linear_pointwise", "_convolution_pointwise", "_reorder_linear_weight", "_reorder_convolution_weight")
        return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in ops)
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


AVAILABLE = _ops_available()
# bf16 (weights and activations, as ``pvt.optimize_for_inference`` casts them) where oneDNN runs
# it in hardware; elsewhere it would be emulated and the plain ops are no slower.
_DTYPES = (
    (torch.float32, torch.bfloat16) if AVAILABLE and torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
)
_enabled = True
_packing = True
# weight -> ((data_ptr, version, conv input shape) it was packed for, packed copy); entries go
# with their weights.
_packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def set_enabled(enabled: bool) -> bool:
    """Turn the fused path on or off for this process (e.g. to time or check the plain path);
    returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def set_packing(enabled: bool, *, release_packed: bool = True) -> bool:
    """Turn weight prepacking on or off (off: oneDNN reorders the weights on every call, and no
    extra memory); returns the previous setting. Turning it off frees the packed copies unless
    ``release_packed`` is False (to compare both ways without repacking)."""
    global _packing
    previous, _packing = _packing, enabled
    if not enabled and release_packed:
        release()
    return previous


def usable(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module``'s forward on ``x`` may take the fused path."""
    if not (AVAILABLE and _enabled) or torch.is_grad_enabled():
        return False
    if x.device.type != "cpu" or x.dtype not in _DTYPES or torch.is_autocast_enabled("cpu"):
        return False
    # Compilers fuse on their own; exporters want standard ops.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # type: ignore[attr-defined]
        return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    # Any submodule in train mode (dropout, drop path) or observed by a hook: run the modules.
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def release(module: nn.Module | None = None) -> None:
    """Drop the packed weights of ``module``'s parameters (of every module when None)."""
    if module is None:
        _packed.clear()
        return
    for p in module.parameters():
        _packed.pop(p, None)


def packed_weight(layer: nn.Linear | nn.Conv2d, x: Tensor | None = None) -> Tensor:
    """``layer.weight`` in oneDNN's blocked layout, packed on first use and reused until the weight
    changes (a new tensor or a bumped version counter). A convolution's packing depends on its
    input's shape (``x``; packed without it, oneDNN picked formats up to 50x slower), so the latest
    shape is kept and another shape repacks."""
    w = layer.weight
    if not _packing:
        return w
    # Weights made under inference mode (a model built or copied there) have no version counter:
    # only a new tensor is seen as a change for them.
    try:
        version = w._version
    except RuntimeError:
        version = -1
    stamp = (w.data_ptr(), version, None if x is None else tuple(x.shape))
    hit = _packed.get(w)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if isinstance(layer, nn.Linear):
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
    else:
        assert x is not None and isinstance(layer.padding, tuple), "a conv packs for its input shape"
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w, list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups, list(x.shape)
        )
    _packed[w] = (stamp, packed)
    return packed


def linear(x: Tensor, layer: nn.Linear, act: str = "none") -> Tensor:
    """``act(layer(x))`` for ``act`` in none / relu / gelu (erf), in one kernel."""
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(layer), layer.bias, act, [], algorithm)


def linear_add(x: Tensor, layer: nn.Linear, residual: Tensor) -> Tensor:
    """``residual + layer(x)`` in one kernel (a new tensor; ``residual`` is not modified)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed_weight(layer), layer.bias, "add")


def conv2d(x: Tensor, layer: nn.Conv2d, act: str = "none") -> Tensor:
    """``act(layer(x))`` in one kernel; a channels-last ``x`` gives a channels-last result."""
    assert isinstance(layer.padding, tuple), "string padding is not used by PVT"
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._convolution_pointwise(
        x,
        packed_weight(layer, x),
        layer.bias,
        list(layer.padding),
        list(layer.stride),
        list(layer.dilation),
        layer.groups,
        act,
        [],
        algorithm,
    )
