"""Pictures of detections: predictions next to the ground truth, for people who would rather look."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from pvt.detection.data import CocoDetection
from pvt.utils.files import save_png


def draw(image: torch.Tensor, boxes: torch.Tensor, names: list[str], masks: torch.Tensor | None, colour: str) -> Any:
    """``[3, H, W]`` float image with boxes (and boolean masks ``[N, H, W]``) -> ``[3, H, W]`` uint8."""
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, masks.bool(), alpha=0.45)
    return draw_bounding_boxes(canvas, boxes, labels=names, colors=colour, width=2)


@torch.inference_mode()
def predictions_vs_truth(
    model: nn.Module, dataset: CocoDetection, out: str | Path, *, count: int = 6, score: float = 0.3
) -> Path:
    """A PNG with one row per validation image: ground truth (green) left, predictions (yellow) right."""
    model.eval()
    rows = []
    name = dict(enumerate(dataset.class_names))  # the model's labels index the classes from 0
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        pred = model([image])[0]
        keep = pred["scores"] >= score
        truth = draw(image, target["boxes"], [name[int(x)] for x in target["labels"]], target.get("masks"), "lime")
        masks = (pred["masks"][keep, 0] > 0.5) if "masks" in pred else None
        labels = [
            f"{name.get(int(x), x)} {s:.2f}" for x, s in zip(pred["labels"][keep], pred["scores"][keep], strict=True)
        ]
        guess = draw(image, pred["boxes"][keep], labels, masks, "yellow")
        rows.append(torch.cat([truth, torch.full((3, truth.shape[1], 4), 255, dtype=torch.uint8), guess], dim=2))
    grid = torch.cat(rows, dim=1) if rows else torch.zeros(3, 1, 1, dtype=torch.uint8)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    dst = Path(out)
    save_png(picture, dst)
    return dst
