"""``make demo``: build every model, print the measured zoo table, run multi-scale features on a photo.

Later tasks (classification, detection, segmentation) extend this into a train-and-evaluate demo.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pvt.models import create_model
from pvt.zoo import zoo_table

# ImageNet normalisation, as in the papers' pipelines.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_photo() -> tuple[str, torch.Tensor]:
    """A real photo shipped inside scikit-image (no download): ``[1, 3, H, W]`` normalised."""
    from skimage import data

    image = data.coffee()  # 400 x 600 RGB, uint8
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return "skimage.data.coffee()", x.unsqueeze(0)


def main() -> None:
    torch.manual_seed(0)
    print("Model zoo, measured from the code (params with the 1000-class head; GMACs are the")
    print("papers' GFLOPs convention, see pvt.complexity):\n")
    print(zoo_table())

    name, x = load_photo()
    print(f"\nMulti-scale features of {name}, input {list(x.shape)}:")
    for arch in ("pvt_small", "pvt_v2_b2", "pvt_v2_b2_li"):
        model = create_model(arch, features_only=True).eval()
        start = time.perf_counter()
        with torch.inference_mode():
            feats = model(x)
        ms = (time.perf_counter() - start) * 1e3
        shapes = "  ".join(
            f"s{info.reduction}: {list(f.shape)}" for info, f in zip(model.feature_info, feats, strict=True)
        )
        print(f"  {arch:<13} {shapes}  ({ms:.0f} ms)")


if __name__ == "__main__":
    main()
