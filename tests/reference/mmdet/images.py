"""Seeded synthetic RGB test images for the mmdetection parity references (numpy only).

Each image is a two-colour gradient, a sinusoidal texture, 8-15 random rectangles and ellipses, and
Gaussian noise (sigma 6) everywhere, so that no two locations give bit-identical features and detection
scores have no ties.  The sides are multiples of 32 within 800x1333, so mmdetection's test pipeline
(Resize with scale_factor 1.0, pad to 32) is the identity on them.
"""

from __future__ import annotations

import numpy as np

SIZES: tuple[tuple[int, int], ...] = ((512, 512), (384, 640))  # (H, W)


def make_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One [h, w, 3] uint8 RGB image drawn from ``rng``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c0 = rng.uniform(40, 215, size=3)
    c1 = rng.uniform(40, 215, size=3)
    t = (xx / w * 0.6 + yy / h * 0.4)[..., None]
    img = c0 * (1 - t) + c1 * t  # [h, w, 3]
    fx, fy = rng.uniform(0.01, 0.06, size=2)
    img += 12 * np.sin(xx * fx + yy * fy)[..., None]
    for _ in range(int(rng.integers(8, 16))):
        col = rng.uniform(0, 255, size=3)
        bw = int(rng.integers(w // 16, w // 3))
        bh = int(rng.integers(h // 16, h // 3))
        x0 = int(rng.integers(0, w - bw))
        y0 = int(rng.integers(0, h - bh))
        if rng.random() < 0.5:
            img[y0 : y0 + bh, x0 : x0 + bw] = col
        else:
            inside = ((yy - (y0 + bh / 2)) / (bh / 2)) ** 2 + ((xx - (x0 + bw / 2)) / (bw / 2)) ** 2 <= 1
            img[inside] = col
    img += rng.normal(0, 6, size=img.shape)
    out: np.ndarray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def make_images(seed: int = 0) -> list[np.ndarray]:
    """The test images, [H, W, 3] uint8 RGB, one per ``SIZES`` entry, from one ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [make_image(h, w, rng) for h, w in SIZES]


def image_name(img: np.ndarray, index: int) -> str:
    """File name used by make_reference.py (and the key in the reference's ``images`` list)."""
    return f"img{index}_{img.shape[0]}x{img.shape[1]}.png"
