"""Deprecated alias of ``pvt.detection.roi_heads`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.roi_heads as _moved

warnings.warn("pvt.tasks.detection.roi_heads moved to pvt.detection.roi_heads", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
