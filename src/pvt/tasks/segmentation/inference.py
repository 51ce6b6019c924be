"""Deprecated alias of ``pvt.segmentation.inference`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.inference as _moved

warnings.warn("pvt.tasks.segmentation.inference moved to pvt.segmentation.inference", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
