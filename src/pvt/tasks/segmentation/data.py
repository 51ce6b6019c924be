"""Deprecated alias of ``pvt.segmentation.data`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.data as _moved

warnings.warn("pvt.tasks.segmentation.data moved to pvt.segmentation.data", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
