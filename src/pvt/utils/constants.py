"""Constants more than one layer needs, defined once."""

from __future__ import annotations

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet's per-channel RGB mean on 0..1 images: every published PVT was trained with it."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet's per-channel RGB standard deviation on 0..1 images."""
