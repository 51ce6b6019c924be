"""Make ``resize_linear.pt``: OpenCV's own ``cv2.resize(INTER_LINEAR)`` on small seeded uint8 images.

mmdetection's test pipeline resizes the uint8 image with ``mmcv.imrescale`` -> ``cv2.resize(...,
INTER_LINEAR)``; ``pvt.detection.mmdet_compat.cv2_resize_linear_u8`` reproduces it in torch, and
``tests/test_detection_mmdet.py`` checks it against these outputs. Run by hand with OpenCV importable
(for example the side-install of ../shared/tools/mmdet-reference/setup.sh)::

    PYTHONPATH=/tmp/mm-site .venv/bin/python tests/reference/opencv/make_resize_linear.py

Writes ``{"cv2_version", "cases": [{"image": uint8 [H, W, 3], "size": (h, w), "out": uint8 [h, w, 3]}]}``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

# (H, W) -> (h, w): upscales (as 512 -> 800), downscales, an exact 2x downscale (OpenCV's INTER_AREA
# fast path), odd sizes and a row width whose 3 * w is not a multiple of the SIMD width.
CASES = [((37, 53), (80, 115)), ((48, 64), (17, 23)), ((40, 54), (20, 27)), ((21, 31), (50, 74)), ((45, 34), (75, 57))]


def main() -> None:
    rng = np.random.default_rng(0)
    cases = []
    for (h, w), (nh, nw) in CASES:
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = 128 + 60 * np.sin(xx[..., None] * 0.3 + yy[..., None] * 0.2 + np.arange(3))
        img = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        cases.append({"image": torch.from_numpy(img), "size": (nh, nw), "out": torch.from_numpy(out)})
    path = Path(__file__).resolve().parent / "resize_linear.pt"
    torch.save({"cv2_version": cv2.__version__, "cases": cases}, path)
    print(f"wrote {path} ({len(cases)} cases, OpenCV {cv2.__version__})")


if __name__ == "__main__":
    main()
