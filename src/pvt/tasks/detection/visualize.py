"""Deprecated alias of ``pvt.detection.visualize`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.visualize as _moved

warnings.warn("pvt.tasks.detection.visualize moved to pvt.detection.visualize", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
