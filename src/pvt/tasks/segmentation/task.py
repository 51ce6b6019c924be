"""Deprecated alias of ``pvt.segmentation.task`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.segmentation.task as _moved

warnings.warn("pvt.tasks.segmentation.task moved to pvt.segmentation.task", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
