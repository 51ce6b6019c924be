"""A plain detection training loop: the yardstick for the engine's detection training.

torchvision's RetinaNet on PVT v2-b0, GroupNorm head, anchors from 16 px, AdamW at a constant lr,
batch 4, no augmentation, no schedule, no clipping: what a person writes in an afternoon. Built
from torchvision's parts and a PVT feature backbone only (none of pvt-vision's detection code), so
a gap between it and ``pvt train detection`` on the same scenes, iterations and seed is the
engine's to explain::

    python benchmarks/detection_loop.py --style hard --iterations 800 --out runs/loop-hard
    pvt train detection --preset shapes-retinanet --set data.shapes.style=hard --output runs/engine-hard

Writes ``final.json`` (box AP and the settings) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.transforms.functional import to_tensor

import pvt
from pvt.datasets.shapes import ShapesSpec, export_shapes


class Backbone(nn.Module):
    """PVT C3-C5 into torchvision's FPN with its P6/P7 block: ``[B, 3, H, W]`` -> dict of maps."""

    def __init__(self, name: str, channels: int) -> None:
        super().__init__()
        self.body = pvt.create_model(name, features_only=True, out_indices=(1, 2, 3))
        ins = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(ins, channels, extra_blocks=LastLevelP6P7(ins[-1], channels))
        self.out_channels = channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build(name: str, num_classes: int, channels: int, size: int) -> RetinaNet:
    sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in (16, 32, 64, 128, 256))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(channels, 9, num_classes, norm_layer=partial(nn.GroupNorm, 16))
    return RetinaNet(Backbone(name, channels), num_classes, min_size=size, max_size=size,
                     anchor_generator=anchors, head=head)  # fmt: skip


def load_split(coco: COCO, folder: Path) -> list[tuple[Tensor, dict[str, Tensor], int]]:
    """Every image of a split in memory: (image [3, H, W] in 0..1, target, image id)."""
    cats = sorted(coco.getCatIds())
    out = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([cats.index(a["category_id"]) for a in anns], dtype=torch.int64)
        image = to_tensor(Image.open(folder / info["file_name"]).convert("RGB"))
        out.append((image, {"boxes": boxes, "labels": labels}, image_id))
    return out


@torch.inference_mode()
def evaluate(model: RetinaNet, coco: COCO, val: list[Any]) -> dict[str, float]:
    model.eval()
    cats = sorted(coco.getCatIds())
    results = []
    for k in range(0, len(val), 8):
        chunk = val[k : k + 8]
        for (_, _, image_id), det in zip(chunk, model([im for im, _, _ in chunk]), strict=True):
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                         strict=True):  # fmt: skip
                x0, y0, x1, y1 = box
                results.append({"image_id": image_id, "category_id": cats[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "score": score})  # fmt: skip
    model.train()
    if not results:
        return {"bbox_ap": 0.0, "bbox_ap50": 0.0}
    ev = COCOeval(coco, coco.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"bbox_ap": 100 * float(ev.stats[0]), "bbox_ap50": 100 * float(ev.stats[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", default="plain", help="data.shapes.style of the embedded scenes")
    p.add_argument("--root", type=Path, help="a COCO-layout folder instead of the embedded scenes")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--model", default="pvt_v2_b0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    root = a.root or export_shapes(ShapesSpec(style=a.style))
    train_coco = COCO(str(root / "annotations" / "instances_train2017.json"))
    val_coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    train, val = load_split(train_coco, root / "train2017"), load_split(val_coco, root / "val2017")
    size = int(train[0][0].shape[-1])
    model = build(a.model, len(train_coco.getCatIds()), a.fpn_channels, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr)
    model.train()
    order: list[int] = []
    t0 = time.perf_counter()
    for it in range(1, a.iterations + 1):
        if len(order) < a.batch:  # a new epoch: a fresh permutation
            order += torch.randperm(len(train)).tolist()
        batch = [train[order.pop(0)] for _ in range(a.batch)]
        losses = model([im for im, _, _ in batch], [t for _, t, _ in batch])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        if it % 50 == 0:
            print(f"iteration {it}: loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    metrics = evaluate(model, val_coco, val)
    record = {**metrics, **vars(a), "root": str(root), "out": str(a.out), "seconds": time.perf_counter() - t0,
              "torch_threads": torch.get_num_threads(), "np": np.__version__}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "final.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
