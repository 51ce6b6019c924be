"""Deprecated alias of ``pvt.detection.models`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.models as _moved

warnings.warn("pvt.tasks.detection.models moved to pvt.detection.models", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
