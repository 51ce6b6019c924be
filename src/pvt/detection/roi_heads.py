"""Mask R-CNN RoI heads whose mask loss leaves out instances without a mask.

``CocoDetection`` keeps an instance whose polygons were all degenerate for the box losses and
flags it ``mask_valid`` False with an all-zero mask. torchvision's ``maskrcnn_loss`` has no
per-instance weight, so its RoIs would learn an all-background mask. Here the positive RoIs
matched to such an instance are left out of the mask branch (as mmdetection and detectron2 do:
instances without a mask give no mask target); the box, class and RPN losses keep them.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss


def _all_masks_valid(targets: list[dict[str, Tensor]]) -> bool:
    """Whether no target flags an instance ``mask_valid`` False (a missing key means all valid)."""
    return all(bool(t["mask_valid"].all()) for t in targets if "mask_valid" in t)


class MaskValidRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads``; in training, positive RoIs whose matched instance has
    ``mask_valid`` False get no mask target. Batches whose instances all have a mask (or no
    ``mask_valid`` at all) and inference run torchvision's code unchanged."""

    @classmethod
    def from_torchvision(
        cls, heads: RoIHeads, *, box_roi_pool: nn.Module | None = None, mask_roi_pool: nn.Module | None = None
    ) -> Self:
        """The same layers and settings as ``heads`` (the poolers replaced where given)."""
        assert heads.mask_head is not None and heads.mask_predictor is not None
        return cls(
            heads.box_roi_pool if box_roi_pool is None else box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool if mask_roi_pool is None else mask_roi_pool,
            mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
        )

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training or targets is None or not self.has_mask() or _all_masks_valid(targets):
            result, losses = super().forward(features, proposals, image_shapes, targets)  # torchvision's
            if not self.training:
                # Labels index the model's classes (``class_names``) directly, as RetinaNet's do:
                # torchvision's slot 0 is the background (the masks were picked by the 1-based label).
                for r in result:
                    r["labels"] = r["labels"] - 1
            return result, losses
        return [], self._losses(features, proposals, image_shapes, targets)

    def _losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """torchvision's training branch (same sampling, box and mask losses), with the mask RoIs
        restricted to positives matched to an instance that has a mask."""
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        mask_proposals, mask_idxs = [], []
        for boxes, matched, label, t in zip(proposals, matched_idxs, labels, targets, strict=True):
            pos = torch.where(label > 0)[0]
            if "mask_valid" in t:
                # positives only: a background RoI's matched index is a placeholder 0, and an image
                # without instances has an empty mask_valid
                pos = pos[t["mask_valid"][matched[pos]]]
            mask_proposals.append(boxes[pos])
            mask_idxs.append(matched[pos])
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        # No positive left (every instance maskless): maskrcnn_loss returns mask_logits.sum() * 0,
        # a zero that keeps the mask head in the graph (no NaN from a mean over nothing).
        loss_mask = maskrcnn_loss(
            mask_logits, mask_proposals, [t["masks"] for t in targets], [t["labels"] for t in targets], mask_idxs
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}


__all__ = ["MaskValidRoIHeads"]
