"""Deprecated alias of ``pvt.layers.blocks`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.layers.blocks as _moved

warnings.warn("pvt.models.layers moved to pvt.layers.blocks", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
