"""COCO evaluation of boxes and masks with pycocotools' ``COCOeval`` itself (not a re-implementation)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

STAT_NAMES = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l", "ar1", "ar10", "ar100", "ar_s", "ar_m", "ar_l")


def to_coco_results(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_cat: Mapping[int, int],
    *,
    masks: bool,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """torchvision detector outputs (original-image coordinates) -> COCO result records."""
    from pycocotools import mask as mask_utils

    results: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = out["scores"].tolist(), out["labels"].tolist()
        rles: list[Any] = [None] * len(scores)
        if masks and "masks" in out:
            binary = (out["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
            for r in rles:
                r["counts"] = r["counts"].decode("ascii")
        for box, score, label, rle in zip(xywh, scores, labels, rles, strict=True):
            rec: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(label_to_cat[int(label)]),
                "bbox": [round(v, 3) for v in box],
                "score": float(score),
            }
            if rle is not None:
                rec["segmentation"] = rle
            results.append(rec)
    return results


def coco_evaluate(
    ann_file: str | Path, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",)
) -> tuple[dict[str, float], str]:
    """Run ``COCOeval`` per IoU type -> (metrics in percent: ``{type}_{stat}`` for the twelve summary
    numbers and ``{type}_ap/{class}`` per class, the printed summary text)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    text = io.StringIO()
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(text):
        gt = COCO(str(ann_file))
        for iou_type in iou_types:
            if not results:  # nothing detected: every number is 0 (loadRes refuses an empty list)
                metrics.update({f"{iou_type}_{k}": 0.0 for k in STAT_NAMES})
                metrics.update({f"{iou_type}_ap/{c['name']}": 0.0 for c in gt.cats.values()})
                continue
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            print(f"--- {iou_type} ---")
            ev.summarize()
            metrics.update({f"{iou_type}_{k}": 100.0 * float(v) for k, v in zip(STAT_NAMES, ev.stats, strict=True)})
            precision = ev.eval["precision"]  # [iou, recall, class, area, max_dets]
            for k, cat_id in enumerate(ev.params.catIds):
                p = precision[:, :, k, 0, -1]
                name = gt.cats[cat_id]["name"]
                metrics[f"{iou_type}_ap/{name}"] = 100.0 * float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return metrics, text.getvalue()
