"""Deprecated alias of ``pvt.detection.evaluate`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.evaluate as _moved

warnings.warn("pvt.tasks.detection.evaluate moved to pvt.detection.evaluate", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
