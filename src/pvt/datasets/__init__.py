"""Embedded datasets the presets use as their default data."""
