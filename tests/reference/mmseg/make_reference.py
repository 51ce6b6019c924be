"""Make ``semantic_fpn_pvt_tiny.pt``: mmsegmentation's own FPN neck and FPNHead on seeded weights.

The authors' Semantic FPN (mmseg 0.13 ``EncoderDecoder``) is the official PVT backbone under
mmseg's ``FPN`` and ``FPNHead``. This script runs mmsegmentation 1.2.2's ``FPN`` / ``FPNHead``
(the same code as 0.13 for these two modules; pure Python, no compiled ops), built from the
authors' config values and loaded with ``weights.make_state_dict``'s tensors, on features of the
official-layout backbone (this project's PVT, itself checked against timm and HF transformers in
tests/test_parity.py), exactly as ``EncoderDecoder.encode_decode`` does: normalise in 0-255 units,
backbone, neck, head, bilinear resize to the input size (align_corners=False).

Run by hand (needs mmseg, mmengine, mmcv-lite beside the project's venv):

    PY=.venv/bin/python; H=../shared/tools/mmdet-reference
    bash $H/setup.sh && $PY -m pip install --target /tmp/mmseg-site --no-deps mmsegmentation==1.2.2 ftfy regex wcwidth
    PYTHONPATH=/tmp/mmseg-site:/tmp/mm-site:$H/harness OMP_NUM_THREADS=1 $PY tests/reference/mmseg/make_reference.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mm_shim  # noqa: E402,F401  (mmcv._ext stand-in; must come before mmcv / mmseg)
from mmseg.models.decode_heads import FPNHead  # noqa: E402
from mmseg.models.necks import FPN  # noqa: E402
from mmseg.models.utils import resize  # noqa: E402
from weights import make_image, make_state_dict  # noqa: E402

import pvt  # noqa: E402

MODEL, SEED = "pvt_tiny", 0
SIZES = ((128, 192), (160, 128))
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def main() -> None:
    torch.set_num_threads(1)
    sd = make_state_dict(MODEL, SEED)
    backbone = pvt.create_model(MODEL, features_only=True, checkpoint=sub(sd, "backbone.")).eval()
    # The authors' config (segmentation/configs/sem_fpn/PVT/fpn_pvt_t_ade20k_40k.py).
    neck = FPN(in_channels=[64, 128, 320, 512], out_channels=256, num_outs=4).eval()
    head = FPNHead(
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=dict(type="BN", requires_grad=True),  # SyncBN in training; the same keys and eval maths
        align_corners=False,
    ).eval()
    neck.load_state_dict(sub(sd, "neck."), strict=True)
    head.load_state_dict(sub(sd, "decode_head."), strict=True)
    g = torch.Generator().manual_seed(1)
    cases = []
    for i, (h, w) in enumerate(SIZES):
        img = torch.from_numpy(make_image(h, w, seed=i)).permute(2, 0, 1).float()[None]
        x = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            feats = neck(backbone(x))
            logits = resize(head(list(feats)), size=(h, w), mode="bilinear", align_corners=False)[0]
        idx = torch.randperm(logits.numel(), generator=g)[:4000].clone()
        cases.append(
            {
                "size": (h, w),
                "image_seed": i,
                "index": idx,
                "logits": logits.flatten()[idx].clone(),
                "labels": logits.argmax(0).to(torch.uint8),
                "fpn_mean": torch.stack([f.mean() for f in feats]),
            }
        )
        print(f"{h}x{w}: logits std {logits.std():.3f}, classes used {logits.argmax(0).unique().numel()}")
    out = {"model": MODEL, "seed": SEED, "mmseg": __import__("mmseg").__version__, "cases": cases}
    torch.save(out, HERE / f"semantic_fpn_{MODEL}.pt")
    print("wrote", HERE / f"semantic_fpn_{MODEL}.pt")


if __name__ == "__main__":
    main()
