"""Make ``align_resize.pt``: the authors' Semantic FPN test-time resize, by mmcv's own functions.

The authors' ``AlignResize`` (segmentation/align_resize.py in their repository, mmseg 0.13) is
``mmcv.imrescale(img, (2048, 512), return_scale=True)`` (keep-ratio, OpenCV bilinear on the uint8
image) followed by ``mmcv.imresize`` to both sides rounded up to a multiple of 32. This script runs
those two mmcv calls on seeded images and keeps sampled output pixels.

    PYTHONPATH=/tmp/mm-site OMP_NUM_THREADS=1 .venv/bin/python tests/reference/mmseg/make_align_resize.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mmcv  # noqa: E402
from weights import make_image  # noqa: E402

SIZES = ((333, 500), (480, 640), (700, 467))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for i, (h, w) in enumerate(SIZES):
        img = make_image(h, w, seed=20 + i)
        rescaled, _ = mmcv.imrescale(img, (2048, 512), return_scale=True, interpolation="bilinear")
        ah, aw = (int(np.ceil(s / 32)) * 32 for s in rescaled.shape[:2])
        aligned = mmcv.imresize(rescaled, (aw, ah), interpolation="bilinear")
        x = torch.from_numpy(aligned).permute(2, 0, 1).contiguous()
        idx = torch.randperm(x.numel(), generator=g)[:6000].to(torch.int32)
        cases.append({"size": (h, w), "image_seed": 20 + i, "shape": tuple(x.shape), "index": idx,
                      "values": x.flatten()[idx.long()].clone()})  # fmt: skip
        print(f"{h}x{w} -> {rescaled.shape[:2]} -> {tuple(x.shape)}")
    torch.save({"mmcv": mmcv.__version__, "cases": cases}, HERE / "align_resize.pt")


if __name__ == "__main__":
    main()
