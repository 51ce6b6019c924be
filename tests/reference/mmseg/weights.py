"""Seeded weights in the layout of the authors' Semantic FPN files (mmseg 0.13), made with torch only.

The parity test regenerates them bit for bit (torch's CPU generator is deterministic), so no
checkpoint is committed: only the key list (``keys_<model>.txt``) and mmseg's outputs on them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def read_keys(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """``keys_<model>.txt``: one ``name shape`` per line, shape as ``64x3x4x4`` (``-`` for a scalar)."""
    out = []
    for line in (HERE / f"keys_{model}.txt").read_text().splitlines():
        name, shape = line.split()
        out.append((name, () if shape == "-" else tuple(int(s) for s in shape.split("x"))))
    return out


def make_state_dict(model: str = "pvt_tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """Non-degenerate random weights for every key, drawn in file order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    sd: dict[str, torch.Tensor] = {}
    for name, shape in read_keys(model):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            sd[name] = torch.tensor(0, dtype=torch.long)
        elif leaf == "running_var":
            sd[name] = torch.rand(shape, generator=g) + 0.5
        elif leaf == "running_mean":
            sd[name] = normal(shape, 0.1)
        elif "pos_embed" in leaf or leaf == "bias":
            sd[name] = normal(shape, 0.02)
        elif len(shape) == 1:  # LayerNorm / BatchNorm scale
            sd[name] = normal(shape, 0.1, 1.0)
        else:  # linear or conv: variance-preserving for the input fan
            fan_in = math.prod(shape[1:])
            sd[name] = normal(shape, math.sqrt(1.0 / fan_in))
    return sd


def make_image(h: int = 128, w: int = 192, seed: int = 0) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB: a gradient, a sinusoid and a few rectangles with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 200, 100 + 80 * np.sin(xx / 7.0) * np.cos(yy / 5.0)], axis=-1)
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 16), rng.integers(0, w - 16)
        img[y0 : y0 + rng.integers(8, 40), x0 : x0 + rng.integers(8, 60)] = rng.integers(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
