"""``pvt.runtime.keep_freed_memory``: large freed blocks are reused instead of page-faulted in."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# A forward pass in miniature, with freed memory kept: three activations of N floats alive at once
# (above glibc's initial 128 KiB mmap threshold), then all freed; prints the minor page faults of
# the last 20 rounds.
_SNIPPET = """
import resource, sys, torch
from pvt.runtime import keep_freed_memory
assert keep_freed_memory() and keep_freed_memory()  # the second call is a no-op
for i in range(30):
    if i == 10:  # after the allocator's first growth
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(int(sys.argv[1]))
    b = a + 1
    c = a + b
    del a, b, c
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize(
    ("floats", "bound"),
    [
        # 8 MiB blocks, 60 allocations of 2048 pages. Kept: 0 faults in most runs, one late heap
        # growth of one block (2048) in about one in five (40 runs). Returned to the OS: 4,064 to
        # 122,240 (= 20 rounds x 3 x 2048) in 11 of 12 runs, 0 in one, depending on the allocator's
        # history.
        (2 << 20, 3000),
        # 48 MiB blocks, as a training step's activations (above glibc's 32 MiB default ceiling, so
        # always mmap'd without the setting): 737,280 faults (20 x 3 x 12,288) returned to the OS.
        (12 << 20, 40_000),
    ],
    ids=["8MiB", "48MiB"],
)
def test_keeping_freed_memory_removes_page_faults(floats: int, bound: int) -> None:
    out = subprocess.run([sys.executable, "-c", _SNIPPET, str(floats)], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < bound


def test_cli_keeps_freed_memory() -> None:
    code = (
        "from pvt.cli import main; from pvt.runtime import malloc as runtime; "
        "main(['models', 'pvt_tiny']); print(runtime.keeps_freed_memory())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "True"
