"""Detection task: RetinaNet / Mask R-CNN models, COCO data, COCO evaluation."""
