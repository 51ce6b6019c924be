"""Deprecated alias of ``pvt.segmentation.metrics`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.metrics as _moved

warnings.warn("pvt.tasks.segmentation.metrics moved to pvt.segmentation.metrics", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
