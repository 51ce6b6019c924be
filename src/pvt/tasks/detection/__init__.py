"""Detection task: RetinaNet / Mask R-CNN models (data, evaluation and training follow)."""
