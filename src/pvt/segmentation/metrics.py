"""mIoU, mAcc, aAcc and per-class IoU from a confusion matrix (mmseg's definitions)."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``[num_classes, num_classes]`` int64 counts, rows = true class, columns = predicted class;
    pixels labelled ``ignore_index`` are left out."""
    keep = label != ignore_index
    index = label[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(cm: Tensor, class_names: list[str]) -> dict[str, float]:
    """Percent. IoU = TP / (TP + FP + FN) per class; classes absent from both the labels and the
    predictions are left out of the means (NaN), as mmseg does. mAcc averages per-class recall;
    aAcc is pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    label_area, pred_area = cm.sum(1), cm.sum(0)
    iou = tp / (label_area + pred_area - tp)  # NaN where the class never occurs
    acc = tp / label_area
    out = {
        "mIoU": 100 * float(iou.nanmean()),
        "mAcc": 100 * float(acc.nanmean()),
        "aAcc": 100 * float(tp.sum() / cm.sum().clamp(min=1)),
    }
    for name, i, a in zip(class_names, iou.tolist(), acc.tolist(), strict=True):
        out[f"iou/{name}"] = 100 * i
        out[f"acc/{name}"] = 100 * a
    return out


def per_class_table(metrics: dict[str, float]) -> str:
    """Markdown table of per-class IoU and accuracy (percent; nan where the class never occurs)."""
    names = [k.split("/", 1)[1] for k in metrics if k.startswith("iou/")]
    lines = ["| class | IoU | Acc |", "|---|---|---|"]
    lines += [f"| {n} | {metrics[f'iou/{n}']:.1f} | {metrics[f'acc/{n}']:.1f} |" for n in names]
    summary = f"| **mean** | **{metrics['mIoU']:.2f}** | **{metrics['mAcc']:.2f}** |"
    return "\n".join([*lines, summary, f"aAcc {metrics['aAcc']:.2f}"]) + "\n"
