"""Deprecated alias of ``pvt.segmentation.convert`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.convert as _moved

warnings.warn("pvt.tasks.segmentation.convert moved to pvt.segmentation.convert", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
