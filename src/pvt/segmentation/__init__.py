"""Semantic segmentation on PVT: ``pvt.segmentation.semantic_fpn`` and inference helpers.

>>> model = semantic_fpn("pvt_v2_b0", num_classes=5)
>>> labels = predict_labels(model.eval(), image)  # image [3, H, W] in 0..1 -> [H, W] class indices
"""

from pvt.segmentation.inference import infer, predict_labels
from pvt.segmentation.metrics import confusion_matrix, segmentation_metrics
from pvt.segmentation.models import SemanticFPN, SemanticFPNHead, semantic_fpn

__all__ = [
    "SemanticFPN",
    "SemanticFPNHead",
    "confusion_matrix",
    "infer",
    "predict_labels",
    "segmentation_metrics",
    "semantic_fpn",
]
