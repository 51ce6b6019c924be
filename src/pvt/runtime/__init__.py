"""How a built model runs fast: precision (bf16 / int8, hardware probing) and the process allocator.

``pvt.runtime.precision`` (``optimize_for_inference``) loads on use; ``keep_freed_memory`` is here.
"""

from pvt.runtime.malloc import keep_freed_memory

__all__ = ["keep_freed_memory"]
