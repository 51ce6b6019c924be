"""Deprecated alias of ``pvt.detection.mmdet_compat`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.mmdet_compat as _moved

warnings.warn("pvt.tasks.detection.mmdet_compat moved to pvt.detection.mmdet_compat", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
