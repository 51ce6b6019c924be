"""Deprecated: the segmentation task moved to ``pvt.segmentation``; these aliases go in the next release."""
