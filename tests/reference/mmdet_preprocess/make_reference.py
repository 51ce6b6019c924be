"""Make ``preprocess.pt``: mmdetection 3.3's own test-time preprocessing of photos of odd sizes.

The stock test pipeline of every PVT config (``LoadImageFromFile``, ``Resize(scale=(1333, 800),
keep_ratio=True)``, ``PackDetInputs``) and ``DetDataPreprocessor(mean, std, bgr_to_rgb=True,
pad_size_divisor=32)``, run by mmdetection's and mmcv's code on seeded images; saved per image:
the resized size, ``scale_factor``, the padded batch shape, the whole network input at a reduced
precision-free sub-sample, and its per-channel means.

Run by hand (mmdet, mmengine, mmcv-lite beside the venv, see ../../../../shared/tools/mmdet-reference):

    PYTHONPATH=/tmp/mm-site:../shared/tools/mmdet-reference/harness OMP_NUM_THREADS=1 \\
        .venv/bin/python tests/reference/mmdet_preprocess/make_reference.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "mmseg"))

import mm_shim  # noqa: E402,F401  (mmcv._ext stand-in; must come before mmcv / mmdet)
from mmcv.transforms import Compose  # noqa: E402
from mmdet.models.data_preprocessors import DetDataPreprocessor  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from PIL import Image  # noqa: E402
from weights import make_image  # noqa: E402

# (H, W): upscaled (short side -> 800), downscaled by the long side, and downscaled by the short side.
SIZES = ((300, 451), (480, 357), (1000, 1500), (900, 700))
PIPELINE = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]


def main() -> None:
    torch.set_num_threads(1)
    register_all_modules()
    pipe = Compose(PIPELINE)
    pre = DetDataPreprocessor(
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32
    )
    g = torch.Generator().manual_seed(0)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (h, w) in enumerate(SIZES):
            path = Path(tmp) / f"img{i}.png"
            Image.fromarray(make_image(h, w, seed=10 + i)).save(path)
            packed = pipe(dict(img_path=str(path), img_id=i))
            batch = pre({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, False)
            x = batch["inputs"][0]  # [3, Hp, Wp] normalised RGB, zero-padded
            meta = batch["data_samples"][0].metainfo
            idx = torch.randperm(x.numel(), generator=g)[:8000].to(torch.int32)
            cases.append(
                {
                    "size": (h, w),
                    "image_seed": 10 + i,
                    "img_shape": tuple(meta["img_shape"]),
                    "scale_factor": tuple(float(s) for s in meta["scale_factor"]),
                    "batch_shape": tuple(x.shape),
                    "index": idx,
                    "values": x.flatten()[idx].clone(),
                    "channel_mean": x.mean(dim=(1, 2)).clone(),
                }
            )
            print(f"{h}x{w} -> img_shape {meta['img_shape']}, scale {meta['scale_factor']}, batch {tuple(x.shape)}")
    torch.save({"mmdet": __import__("mmdet").__version__, "cases": cases}, HERE / "preprocess.pt")
    print("wrote", HERE / "preprocess.pt")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
