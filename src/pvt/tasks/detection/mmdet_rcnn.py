"""Deprecated alias of ``pvt.detection.mmdet_rcnn`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.detection.mmdet_rcnn as _moved

warnings.warn("pvt.tasks.detection.mmdet_rcnn moved to pvt.detection.mmdet_rcnn", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
