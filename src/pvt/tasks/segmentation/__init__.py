"""Segmentation task: Semantic FPN models, image / label-map data, mIoU evaluation."""
