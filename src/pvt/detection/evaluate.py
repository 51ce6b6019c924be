"""COCO evaluation of boxes and masks with pycocotools' ``COCOeval`` itself (not a re-implementation)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvt.detection.data import valid_polygon

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


def mask_ground_truth(coco: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The ground truth for mask AP: degenerate polygons (fewer than 3 points, an odd number of
    coordinates) removed, since pycocotools fails on them; an instance left without a polygon
    becomes a crowd region the size of its box, so that a detection of it is ignored, neither a
    hit nor a false positive, as its mask is ignored by the mask loss in training. Returns the
    new dict and how many instances were so ignored; ``coco`` is not changed."""
    anns, ignored = [], 0
    for ann in coco["annotations"]:
        seg = ann.get("segmentation")
        if isinstance(seg, dict) or ann.get("iscrowd", 0):
            anns.append(ann)
            continue
        polygons = [p for p in seg or [] if valid_polygon(p)]
        if not polygons:
            x, y, w, h = ann["bbox"]
            polygons, ignored = [[x, y, x + w, y, x + w, y + h, x, y + h]], ignored + 1
            ann = {**ann, "iscrowd": 1}
        anns.append({**ann, "segmentation": polygons})
    return {**coco, "annotations": anns}, ignored


def _coco_api(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dataset
    api.createIndex()
    return api


def coco_evaluate(
    ann_file: str | Path, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox",)
) -> tuple[dict[str, float], str]:
    """Run ``COCOeval`` per IoU type -> (metrics in percent: ``{type}_{stat}`` for the twelve summary
    numbers and ``{type}_ap/{class}`` per class, the printed summary text). Mask AP reads the
    ground truth through :func:`mask_ground_truth`."""
    from pycocotools.cocoeval import COCOeval

    text = io.StringIO()
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(text):
        raw = json.loads(Path(ann_file).read_text())
        for iou_type in iou_types:
            dataset = raw
            if iou_type == "segm":
                dataset, ignored = mask_ground_truth(raw)
                if ignored:
                    print(f"{ann_file}: {ignored} instance(s) without a valid polygon are ignored for mask AP")
            gt = _coco_api(dataset)
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
