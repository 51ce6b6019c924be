"""Deprecated alias of ``pvt.classification`` (moved there); it goes in the next release."""

import sys
import warnings

import pvt.classification as _moved

warnings.warn("pvt.tasks.classification moved to pvt.classification", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
