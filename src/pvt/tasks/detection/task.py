"""Deprecated alias of ``pvt.detection.task`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.task as _moved

warnings.warn("pvt.tasks.detection.task moved to pvt.detection.task", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
