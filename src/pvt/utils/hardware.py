"""What the CPU can do fast, read once from Linux's ``/proc/cpuinfo``: which precisions pay.

Used by inference (``pvt.runtime.precision``), training (``train.amp=auto``) and the benchmarks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

# The CPU features that decide what runs fast, in the order benchmarks report them.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
EMULATED_BF16_SLOWDOWN = "~14x slower than fp32 (measured on an AMD EPYC without bf16 units)"


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and which of ``CPU_FLAGS`` it has (Linux ``/proc/cpuinfo``)."""

    model: str
    flags: frozenset[str]

    @property
    def bf16(self) -> bool:
        """bf16 dot products in hardware (AMX tiles or AVX512-BF16)."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def int8_dot(self) -> bool:
        """int8 dot products in hardware (VNNI or AMX-INT8), where int8 GEMMs are fast."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    def describe(self) -> str:
        shown = [f for f in CPU_FLAGS if f in self.flags]
        return f"{self.model} ({' '.join(shown) or 'none of ' + ', '.join(CPU_FLAGS)})"


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> CpuInfo:
    import platform

    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = frozenset(value.split()) & frozenset(CPU_FLAGS)
                break
    except OSError:  # not Linux: no flags known, so nothing is assumed
        pass
    return CpuInfo(model, flags)
