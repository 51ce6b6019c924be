"""Deprecated: the detection task moved to ``pvt.detection``; these aliases go in the next release."""
