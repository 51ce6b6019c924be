"""Pictures of segmentations: image, ground truth and prediction side by side, for people who would rather look."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pvt.segmentation.data import SegmentationFolder
from pvt.segmentation.inference import predict_labels
from pvt.segmentation.task import overlay, palette
from pvt.utils.files import save_png


@torch.inference_mode()
def predictions_vs_truth(
    model: nn.Module, dataset: SegmentationFolder, out: str | Path, *, count: int = 6, **infer_kwargs: Any
) -> Path:
    """A PNG with one row per validation image: the image, the ground truth and the prediction
    overlaid in class colours (ignored pixels shown in grey)."""
    model.eval()
    colours = palette(dataset.num_classes)
    rows = []
    for i in range(min(count, len(dataset))):
        image, label, _ = dataset[i]
        rgb = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        truth = label.numpy()
        ignored = truth == dataset.ignore_index
        gt = overlay(rgb, np.where(ignored, 0, truth), colours)
        gt[ignored] = 128
        pred = overlay(rgb, predict_labels(model, image, **infer_kwargs).numpy(), colours)
        gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([rgb, gap, gt, gap, pred], axis=1))
    width = max(r.shape[1] for r in rows) if rows else 1
    grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    picture = Image.fromarray(grid)
    dst = Path(out)
    save_png(picture, dst)
    return dst
