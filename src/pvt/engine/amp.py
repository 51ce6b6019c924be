"""Training precision: ``train.amp`` = none | bf16 | fp16 | auto.

Autocast, never a model cast: the weights, the gradients and AdamW's state stay fp32 (the master
copy), and autocast runs only the matrix products (linear, convolution, attention) in the low
precision. Losses run in fp32 (autocast's fp32 list: cross entropy, smooth L1, BCE with logits),
and on CPU the bf16 LayerNorm and softmax kernels accumulate their statistics in fp32.

``auto`` is bf16 where the hardware computes it (a GPU with bf16; a CPU with AVX512-BF16 or AMX),
fp32 elsewhere. ``bf16`` on a CPU without either warns and trains fp32, as inference does: there
bf16 would run emulated, an order of magnitude slower.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

from pvt.utils.hardware import EMULATED_BF16_SLOWDOWN, CpuInfo, cpu_info

AMPS = ("none", "bf16", "fp16", "auto")


def resolve_amp(amp: str, device: torch.device | str, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """(the precision that will train: none | bf16 | fp16, why) for ``train.amp`` on ``device``."""
    if amp not in AMPS:
        raise ValueError(f"train.amp must be one of {', '.join(AMPS)}, not {amp!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if amp == "auto":
            return ("bf16", "this GPU computes bf16") if bf16_ok else ("none", "this GPU has no bf16")
        if amp == "bf16" and not bf16_ok:
            warnings.warn("train.amp=bf16, but this GPU has no bf16 arithmetic: training fp32", stacklevel=2)
            return "none", "bf16 asked for, but this GPU has no bf16: fp32"
        return amp, "asked for"
    if amp == "fp16":
        raise ValueError("train.amp=fp16 needs a GPU; use train.amp=bf16 (or auto) on CPU")
    cpu = cpu or cpu_info()
    units = " and ".join(f for f in ("amx_bf16", "avx512_bf16") if f in cpu.flags)
    if amp == "auto":
        if cpu.bf16:
            return "bf16", f"this CPU ({cpu.model}) has {units}"
        return "none", f"this CPU ({cpu.model}) has neither avx512_bf16 nor amx_bf16"
    if amp == "bf16" and not cpu.bf16:
        warnings.warn(
            f"train.amp=bf16, but this CPU ({cpu.model}) has neither avx512_bf16 nor amx_bf16: bf16 would "
            f"run emulated, {EMULATED_BF16_SLOWDOWN}; training fp32",
            stacklevel=2,
        )
        return "none", "bf16 asked for, but this CPU has no bf16 units: fp32"
    return amp, "asked for"


def autocast_factory(amp: str, device: torch.device) -> Callable[[], Any]:
    """Context factory for a resolved precision (bf16 on CPU and GPU, fp16 on GPU only)."""
    if amp == "none":
        return contextlib.nullcontext
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a GPU; use train.amp=bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)
