"""Process-wide settings for CPU speed, applied by the ``pvt`` command line.

glibc hands large freed blocks back to the operating system: by default every block above a
threshold that adapts between 128 KiB and 32 MiB is its own ``mmap``, and a freed heap top above
twice that is trimmed. A network's activations are exactly such blocks, allocated and freed on
every forward, so each one is page-faulted in (and zeroed by the kernel) again: measured here, up
to ~20,000 page faults per forward of a PVT v2-b2 at batch 1, and timings that swing with the
allocator's history (timm's v2-b2 ran at 330 or 220-250 ms in the same process depending on it).
Keeping freed memory in the process removes the faults, like PyTorch's own GPU caching allocator.
Training holds bigger blocks (pvt_v2_b0 at batch 16: 51 MB activations), so the mmap threshold is
raised to 1 GiB where glibc takes it (2.36 does): with 32 MiB that step still took ~14,000-89,000
page faults (56-288 ms of kernel time) per step, with 1 GiB almost none, 5-13% faster on a 2-core
AMD EPYC.

A library should not change its host process's allocator on import, so this is opt-in for Python
users (``pvt.runtime.keep_freed_memory()``) and done by ``pvt`` commands for their own process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap: a training step's activations
MMAP_THRESHOLD_FALLBACK = 32 << 20  # the largest value older glibc takes on 64-bit
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory (blocks up to 1 GiB, or 32 MiB where glibc refuses more, come
    from the heap, and up to 1 GiB of freed heap stays in the process) so activations stop being
    page-faulted in on every forward. Costs resident memory: the process keeps its peak. Returns
    whether the setting took effect (False off Linux/glibc, where it does nothing); calling it
    again is harmless."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_set = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK))
    _applied = mmap_set and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def keeps_freed_memory() -> bool:
    """Whether ``keep_freed_memory`` has taken effect in this process."""
    return _applied
