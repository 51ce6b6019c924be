"""Deprecated alias of ``pvt.layers.fused`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.layers.fused as _moved

warnings.warn("pvt.models.fused moved to pvt.layers.fused", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
