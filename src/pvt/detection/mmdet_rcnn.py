"""Mask R-CNN with mmdetection 3.3's test-time semantics, built from torchvision's parts.

``mask_rcnn(..., semantics="mmdet")`` swaps four parts of torchvision's ``MaskRCNN`` for the ones
here; the weights (and so the state-dict keys) stay torchvision's:

* :class:`MMDetRPN`: per level sigmoid, unstable descending sort of the *probabilities*, top
  ``pre_nms_top_n``; mmdet's delta decode (stds 1, clamp of dw/dh on both sides, clip to the image);
  boxes with ``w <= 0`` or ``h <= 0`` dropped; mmcv's ``batched_nms`` over level ids (IoU 0.7); first
  ``post_nms_top_n`` (rpn_head.py:182-289).
* :class:`MMDetRoIAlign`: mmdet's ``SingleRoIExtractor``: level ``floor(log2(sqrt(w*h)/56 + 1e-6))``
  clamped to P2-P5, mmcv ``RoIAlign(aligned=True, sampling_ratio=0)``, which is torchvision's
  ``roi_align(aligned=True, sampling_ratio=0)`` (both are Detectron2's CPU kernel: the same
  ``ceil(roi/out)`` adaptive grid, bilinear rules and ``count = max(gh*gw, 1)``).
* :class:`MMDetRoIHeads`: softmax over the 81 logits in mmdet's order (background last),
  class-specific decode with stds (0.1, 0.1, 0.2, 0.2) and clipping, ``score > score_thresh``, *no*
  small-box removal, mmcv ``batched_nms`` over labels, first ``detections_per_img``
  (bbox_head.py:526-561, bbox_nms.py:53-100).
* :class:`pvt.detection.mmdet_compat.MMDetTransform`: mmdet's preprocessing and
  post-processing: boxes divided by the resize scale, masks pasted by ``_do_paste_mask``
  (fcn_mask_head.py:436-468, its CPU path) straight into the original image size.

The rest is the same in both already: FPN (P6 = ``max_pool2d(P5, 1, stride=2)``), RPN conv and
channel order, the box MLP and the mask FCN. Fed mmdetection's own raw outputs, the RPN and RCNN
post-processing here return mmdet's proposals and detections bit for bit, and the pasting its
masks; end to end (tests/test_mask_rcnn_mmdet.py) the remaining differences are float noise from
the backbone (~1e-5 on logits).

Training runs torchvision's losses and samplers unchanged (on the mmdet anchors and RoIAlign), so a
model trained here and a converted one share their test-time meaning; the one change, in both
semantics, is that instances flagged ``mask_valid`` False give no mask target
(``pvt.detection.roi_heads``).

``convert_rcnn_heads`` renames mmdet's RPN and RoI-head tensors to torchvision's names (class order
moved from background-last to background-first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import roi_align

from pvt.checkpoint import CheckpointError
from pvt.detection.mmdet_compat import (
    MMDetAnchorGenerator,
    MMDetTransform,
    mmdet_batched_nms,
    mmdet_decode,
)
from pvt.detection.roi_heads import MaskValidRoIHeads

RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)  # mmdet multiplies by these; torchvision divides by (10, 10, 5, 5)
FINEST_SCALE = 56.0  # SingleRoIExtractor: RoIs below 112 px go to P2, below 224 to P3, ...
ROI_STRIDES = (4, 8, 16, 32)  # P2-P5; P6 only feeds the RPN
RPN_STRIDES = (4, 8, 16, 32, 64)

# ---------------------------------------------------------------------------------------------
# checkpoint conversion


_RPN = re.compile(r"^rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.(weight|bias)$")
_BOX_FC = re.compile(r"^roi_head\.bbox_head\.shared_fcs\.([01])\.(weight|bias)$")
_BOX_OUT = re.compile(r"^roi_head\.bbox_head\.(fc_cls|fc_reg)\.(weight|bias)$")
_MASK_CONV = re.compile(r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$")
_MASK_OUT = re.compile(r"^roi_head\.mask_head\.(upsample|conv_logits)\.(weight|bias)$")
_RPN_NAMES = {"rpn_conv": "conv.0.0", "rpn_cls": "cls_logits", "rpn_reg": "bbox_pred"}


def _background_first(t: Tensor) -> Tensor:
    """``[C + 1, ...]`` rows with the background last (mmdet) -> background first (torchvision)."""
    return torch.cat([t[-1:], t[:-1]], 0)


def _with_background_rows(t: Tensor, per_class: int) -> Tensor:
    """Prepend ``per_class`` zero rows: the background slot torchvision has and mmdet does not."""
    return torch.cat([t.new_zeros((per_class, *t.shape[1:])), t], 0)


def _check_classes(name: str, found: int, num_classes: int) -> None:
    if found != num_classes:
        raise CheckpointError(
            f"{name} holds {found} classes but the model is built for num_classes={num_classes}; "
            f"build it with num_classes={found} (the checkpoint's head) or convert a matching checkpoint"
        )


def convert_rcnn_heads(sd: Mapping[str, Tensor], num_classes: int) -> tuple[dict[str, Tensor], list[str]]:
    """mmdet Mask R-CNN ``rpn_head.*`` / ``roi_head.*`` tensors -> torchvision ``MaskRCNN`` names.

    * ``rpn_head.rpn_conv|rpn_cls|rpn_reg`` -> ``rpn.head.conv.0.0|cls_logits|bbox_pred`` (both lay
      out channels anchor-major with the same ratio order; mmdet's sigmoid RPN has one logit per anchor).
    * ``roi_head.bbox_head.shared_fcs.{0,1}`` -> ``roi_heads.box_head.fc6|fc7``.
    * ``fc_cls`` ``[C+1, D]`` (background last) -> ``box_predictor.cls_score`` (background first).
    * ``fc_reg`` ``[4C, D]`` (class-specific, no background) -> ``box_predictor.bbox_pred`` ``[4(C+1), D]``
      with four zero rows for the background.
    * ``mask_head.convs.{i}.conv`` -> ``mask_head.{i}.0``; ``upsample`` -> ``mask_predictor.conv5_mask``;
      ``conv_logits`` ``[C, ...]`` -> ``mask_predictor.mask_fcn_logits`` ``[C+1, ...]``, zero background first.

    Keys outside ``rpn_head.`` / ``roi_head.`` are left to the caller. Returns (converted tensors,
    the source keys consumed). Raises ``CheckpointError`` on an unknown head tensor, a class-agnostic
    or softmax head, or a class count other than ``num_classes``.
    """
    out: dict[str, Tensor] = {}
    used: list[str] = []
    unknown: list[str] = []
    for k, v in sd.items():
        if not k.startswith(("rpn_head.", "roi_head.")):
            continue
        if m := _RPN.match(k):
            out[f"rpn.head.{_RPN_NAMES[m.group(1)]}.{m.group(2)}"] = v
        elif m := _BOX_FC.match(k):
            out[f"roi_heads.box_head.fc{6 + int(m.group(1))}.{m.group(2)}"] = v
        elif m := _BOX_OUT.match(k):
            if m.group(1) == "fc_cls":
                _check_classes(
                    f"roi_head.bbox_head.fc_cls ({v.shape[0]} rows incl. background)", v.shape[0] - 1, num_classes
                )
                out[f"roi_heads.box_predictor.cls_score.{m.group(2)}"] = _background_first(v)
            else:
                if v.shape[0] == 4:
                    raise CheckpointError(
                        f"{k} is class-agnostic (4 rows); only mmdet's class-specific box regression "
                        "(reg_class_agnostic=False, the Mask R-CNN configs' default) converts"
                    )
                _check_classes(
                    f"roi_head.bbox_head.fc_reg ({v.shape[0]} rows = 4 x classes)", v.shape[0] // 4, num_classes
                )
                out[f"roi_heads.box_predictor.bbox_pred.{m.group(2)}"] = _with_background_rows(v, 4)
        elif m := _MASK_CONV.match(k):
            out[f"roi_heads.mask_head.{m.group(1)}.0.{m.group(2)}"] = v
        elif m := _MASK_OUT.match(k):
            if m.group(1) == "upsample":
                out[f"roi_heads.mask_predictor.conv5_mask.{m.group(2)}"] = v
            else:
                _check_classes(f"roi_head.mask_head.conv_logits ({v.shape[0]} channels)", v.shape[0], num_classes)
                out[f"roi_heads.mask_predictor.mask_fcn_logits.{m.group(2)}"] = _with_background_rows(v, 1)
        else:
            unknown.append(k)
            continue
        used.append(k)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} RPN / RoI-head tensors of an unknown layout (e.g. {', '.join(unknown[:3])}); "
            "expected mmdet's RPNHead, Shared2FCBBoxHead and FCNMaskHead (the Mask R-CNN configs)"
        )
    cls = out.get("rpn.head.cls_logits.weight")
    reg = out.get("rpn.head.bbox_pred.weight")
    if cls is not None and reg is not None and 4 * cls.shape[0] != reg.shape[0]:
        raise CheckpointError(
            f"rpn_head.rpn_cls has {cls.shape[0]} channels for {reg.shape[0] // 4} anchors; only the "
            "sigmoid RPN (use_sigmoid=True, one logit per anchor) converts"
        )
    return out, used


# ---------------------------------------------------------------------------------------------
# RPN


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN whose test-time proposals are mmdet's ``RPNHead.predict``.

    Training (losses, the proposals fed to the RoI sampler) is torchvision's unchanged.
    """

    @classmethod
    def from_torchvision(cls, rpn: RegionProposalNetwork, anchor_generator: AnchorGenerator) -> MMDetRPN:
        """The same head, matcher, sampler and top-n settings as ``rpn``, on ``anchor_generator``."""
        return cls(
            anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
        )

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        if self.training:
            return super().forward(images, features, targets)
        boxes, _ = self.predict(images, features)
        return boxes, {}

    def predict(self, images: ImageList, features: Mapping[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Proposals per image: (boxes ``[P, 4]`` in the resized image, scores ``[P]`` descending)."""
        feats = list(features.values())
        objectness, deltas = self.head(feats)  # per level [B, A, h, w], [B, 4A, h, w]
        anchors = self.anchor_generator(images, feats)  # per image [sum(h*w*A), 4]
        sizes = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        boxes, scores = [], []
        for i, image_anchors in enumerate(anchors):
            b, s = self._predict_single(
                [o[i] for o in objectness], [d[i] for d in deltas], image_anchors.split(sizes), images.image_sizes[i]
            )
            boxes.append(b)
            scores.append(s)
        return boxes, scores

    def _predict_single(
        self, objectness: list[Tensor], deltas: list[Tensor], anchors: Sequence[Tensor], image_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        pre_nms = self.pre_nms_top_n()
        lvl_scores, lvl_deltas, lvl_anchors, lvl_ids = [], [], [], []
        for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors, strict=True)):
            # [A, h, w] -> rows (y, x, a), as mmdet's permute(1, 2, 0).reshape(-1, ...)
            score = obj.permute(1, 2, 0).reshape(-1).sigmoid()
            dlt = dlt.permute(1, 2, 0).reshape(-1, 4)
            if 0 < pre_nms < score.shape[0]:
                score, order = score.sort(descending=True)  # mmdet: sort, not topk (tie order)
                score, order = score[:pre_nms], order[:pre_nms]
                dlt, anc = dlt[order], anc[order]
            lvl_scores.append(score)
            lvl_deltas.append(dlt)
            lvl_anchors.append(anc)
            lvl_ids.append(torch.full_like(score, level, dtype=torch.long))
        scores, ids = torch.cat(lvl_scores), torch.cat(lvl_ids)
        boxes = mmdet_decode(torch.cat(lvl_deltas).detach(), torch.cat(lvl_anchors), RPN_STDS, image_hw)
        wh = boxes[:, 2:] - boxes[:, :2]
        valid = (wh[:, 0] > 0) & (wh[:, 1] > 0)  # min_bbox_size=0
        if not bool(valid.all()):
            boxes, scores, ids = boxes[valid], scores[valid], ids[valid]
        if boxes.numel() == 0:
            return boxes, scores
        keep = mmdet_batched_nms(boxes, scores.detach(), ids, self.nms_thresh)[: self.post_nms_top_n()]
        return boxes[keep], scores[keep]


# ---------------------------------------------------------------------------------------------
# RoI features


class MMDetRoIAlign(nn.Module):
    """mmdet's ``SingleRoIExtractor`` over P2-P5 (a drop-in for ``MultiScaleRoIAlign``).

    ``features`` dict of ``[B, C, H/s, W/s]`` maps (the first ``len(strides)`` are used), ``boxes``
    per image ``[K_i, 4]`` -> ``[sum K_i, C, out, out]`` in the order of the boxes.
    """

    def __init__(
        self,
        output_size: int,
        featmap_names: Sequence[str] = ("0", "1", "2", "3"),
        strides: Sequence[int] = ROI_STRIDES,
        finest_scale: float = FINEST_SCALE,
    ) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError(f"{len(featmap_names)} feature names for {len(strides)} strides")
        self.output_size = output_size
        self.featmap_names = list(featmap_names)
        self.strides = tuple(strides)
        self.finest_scale = finest_scale

    def levels(self, rois: Tensor) -> Tensor:
        """``[K, 5]`` (batch index, x1, y1, x2, y2) -> level index ``[K]`` in ``[0, len(strides))``."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvl = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return lvl.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(
        self, features: Mapping[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]] | None = None
    ) -> Tensor:
        feats = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], 1) for i, b in enumerate(boxes)])
        rois = rois.to(feats[0].dtype)
        out = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], self.output_size, self.output_size))
        levels = self.levels(rois)
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides, strict=True)):
            inds = torch.nonzero(levels == lvl).squeeze(1)
            if inds.numel() > 0:
                out[inds] = roi_align(
                    feat, rois[inds], self.output_size, 1.0 / stride, sampling_ratio=0, aligned=True
                ).to(out.dtype)
            elif self.training:
                # keep every level in the graph (unused parameters would stall DDP), as mmdet does
                out = out + feat.sum() * 0.0
        return out


# ---------------------------------------------------------------------------------------------
# RoI heads


class MMDetRoIHeads(MaskValidRoIHeads):
    """torchvision's box and mask heads with mmdet's RCNN post-process at test time (and, in
    training, no mask target for ``mask_valid`` False instances, see ``roi_heads``)."""

    @classmethod
    def from_torchvision(
        cls, heads: RoIHeads, *, box_roi_pool: nn.Module | None = None, mask_roi_pool: nn.Module | None = None
    ) -> Self:
        """The same layers and settings as ``heads``, with :class:`MMDetRoIAlign` pooling (7 and 14)
        unless other poolers are given."""
        return super().from_torchvision(
            heads,
            box_roi_pool=MMDetRoIAlign(7) if box_roi_pool is None else box_roi_pool,
            mask_roi_pool=MMDetRoIAlign(14) if mask_roi_pool is None else mask_roi_pool,
        )

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``[K, C+1]`` logits (background first), ``[K, 4(C+1)]`` deltas -> per image boxes, scores,
        labels (1..C; 0 stays the background as in torchvision)."""
        sizes = [p.shape[0] for p in proposals]
        out_boxes, out_scores, out_labels = [], [], []
        for logits, deltas, rois, hw in zip(
            class_logits.split(sizes), box_regression.split(sizes), proposals, image_shapes, strict=True
        ):
            b, s, lbl = self._postprocess_single(logits, deltas, rois, hw)
            out_boxes.append(b)
            out_scores.append(s)
            out_labels.append(lbl)
        return out_boxes, out_scores, out_labels

    def _postprocess_single(
        self, logits: Tensor, deltas: Tensor, rois: Tensor, image_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        # mmdet's class order (background last) so the softmax sums in mmdet's order
        logits = torch.cat([logits[:, 1:], logits[:, :1]], 1)
        scores = F.softmax(logits, -1)[:, :-1]  # [K, C]
        num_rois, num_classes = scores.shape
        boxes = mmdet_decode(
            deltas[:, 4:].reshape(-1, 4), rois.repeat_interleave(num_classes, 0), RCNN_STDS, image_hw
        )  # [K*C, 4], row k*C + c
        labels = torch.arange(num_classes, device=scores.device).expand(num_rois, num_classes).reshape(-1)
        scores = scores.reshape(-1)
        inds = torch.nonzero(scores > self.score_thresh).squeeze(1)  # no small-box removal in mmdet
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        if boxes.numel() > 0:
            keep = mmdet_batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return boxes, scores, labels + 1


# ---------------------------------------------------------------------------------------------
# masks and the transform


def rpn_anchor_generator(sizes: Sequence[Sequence[float]], ratios: Sequence[float]) -> MMDetAnchorGenerator:
    """mmdet's RPN anchors for one size per level on strides 4..64 (``scales=[8]`` for 32..512)."""
    if len(sizes) != len(RPN_STRIDES) or any(len(s) != 1 for s in sizes):
        raise ValueError(
            f"semantics='mmdet' takes one RPN anchor size per level for strides {RPN_STRIDES}, got {sizes}"
        )
    scales = {float(s[0]) / stride for s, stride in zip(sizes, RPN_STRIDES, strict=True)}
    if len(scales) != 1:
        raise ValueError(f"semantics='mmdet' needs anchor sizes proportional to the strides {RPN_STRIDES}, got {sizes}")
    return MMDetAnchorGenerator(RPN_STRIDES, ratios, scales=(scales.pop(),))


def to_mmdet_semantics(model: MaskRCNN) -> MaskRCNN:
    """Give a torchvision ``MaskRCNN`` mmdet's test-time behaviour in place; its weights are kept.

    The RPN, RoI pooling, RCNN post-process and transform become mmdet's (the RPN keeps its anchor
    generator: pass :func:`rpn_anchor_generator`'s to ``MaskRCNN``; the transform keeps its sizes).
    """
    model.rpn = MMDetRPN.from_torchvision(model.rpn, model.rpn.anchor_generator)
    model.roi_heads = MMDetRoIHeads.from_torchvision(model.roi_heads)
    model.transform = MMDetTransform(model.transform.min_size, model.transform.max_size)
    return model


__all__ = [
    "MMDetRPN",
    "MMDetRoIAlign",
    "MMDetRoIHeads",
    "convert_rcnn_heads",
    "rpn_anchor_generator",
    "to_mmdet_semantics",
]
