"""Deprecated alias of ``pvt.segmentation.models`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.models as _moved

warnings.warn("pvt.tasks.segmentation.models moved to pvt.segmentation.models", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
