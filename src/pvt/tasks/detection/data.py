"""Deprecated alias of ``pvt.detection.data`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.data as _moved

warnings.warn("pvt.tasks.detection.data moved to pvt.detection.data", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
