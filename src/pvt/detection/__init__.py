"""Object detection and instance segmentation on PVT: ``pvt.detection.retinanet`` / ``mask_rcnn``."""

from pvt.dense.fpn import BackboneFPN, LastLevelP6P7FromC5, backbone_fpn
from pvt.detection.models import mask_rcnn, retinanet

__all__ = ["BackboneFPN", "LastLevelP6P7FromC5", "backbone_fpn", "mask_rcnn", "retinanet"]
