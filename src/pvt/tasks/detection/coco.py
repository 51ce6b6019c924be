"""Deprecated alias of ``pvt.detection.coco`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.coco as _moved

warnings.warn("pvt.tasks.detection.coco moved to pvt.detection.coco", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
