"""Fused oneDNN kernels for CPU inference: linear / conv with the bias, activation or residual add
done in the kernel's epilogue (the ops ``torch.compile`` itself emits on CPU).

Why: profiled at batch 16, a PVT v2 spends ~13% of its CPU time broadcasting biases into
``addmm``'s output and ~12% in a separate GELU pass over the widest tensor of every block (the
4x-expanded hidden layer); the fused kernels write each output once. Numerics are those of the
plain ops (same GEMM; erf GELU), checked against them in the tests.

Used only where nothing can notice the difference: CPU, fp32, no autograd, eval mode, no
autocast, not while ``torch.compile`` or ``torch.jit.trace`` traces (the compiler fuses on its
own; exporters want standard ops), and no forward hooks on the modules involved (``pvt.complexity``
and user hooks see every layer run as a module).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module


def _ops_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


AVAILABLE = _ops_available()
_enabled = True


def set_enabled(enabled: bool) -> bool:
    """Turn the fused path on or off for this process (e.g. to time or check the plain path);
    returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def usable(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module``'s forward on ``x`` may take the fused path."""
    if not (AVAILABLE and _enabled) or torch.is_grad_enabled():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    # Compilers fuse on their own; exporters want standard ops.
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # type: ignore[attr-defined]
        return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    # Any submodule in train mode (dropout, drop path) or observed by a hook: run the modules.
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def linear(x: Tensor, layer: nn.Linear, act: str = "none") -> Tensor:
    """``act(layer(x))`` for ``act`` in none / relu / gelu (erf), in one kernel."""
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, act, [], algorithm)


def linear_add(x: Tensor, layer: nn.Linear, residual: Tensor) -> Tensor:
    """``residual + layer(x)`` in one kernel (a new tensor; ``residual`` is not modified)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")


def conv2d(x: Tensor, layer: nn.Conv2d, act: str = "none") -> Tensor:
    """``act(layer(x))`` in one kernel; a channels-last ``x`` gives a channels-last result."""
    assert isinstance(layer.padding, tuple), "string padding is not used by PVT"
    algorithm = "none" if act == "gelu" else ""
    return torch.ops.mkldnn._convolution_pointwise(
        x,
        layer.weight,
        layer.bias,
        list(layer.padding),
        list(layer.stride),
        list(layer.dilation),
        layer.groups,
        act,
        [],
        algorithm,
    )
