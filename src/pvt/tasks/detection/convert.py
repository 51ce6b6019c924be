"""Deprecated alias of ``pvt.detection.convert`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.convert as _moved

warnings.warn("pvt.tasks.detection.convert moved to pvt.detection.convert", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
