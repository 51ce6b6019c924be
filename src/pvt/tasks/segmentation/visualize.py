"""Deprecated alias of ``pvt.segmentation.visualize`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.visualize as _moved

warnings.warn("pvt.tasks.segmentation.visualize moved to pvt.segmentation.visualize", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
