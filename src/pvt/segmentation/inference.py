"""Test-time inference: whole image or sliding windows, optional flip and extra scales (mmseg)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt.dense.resize import cv2_resize_linear_u8, eight_bit_values
from pvt.segmentation.data import eval_size


def slide_logits(model: nn.Module, x: Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """mmseg ``slide`` mode: windows of ``crop`` every ``stride``, overlapping logits averaged.
    ``x [1, 3, H, W]`` -> ``[1, C, H, W]``."""
    H, W = x.shape[-2:]
    ch, cw = min(crop[0], H), min(crop[1], W)
    rows = max(math.ceil((H - ch) / stride[0]), 0) + 1
    cols = max(math.ceil((W - cw) / stride[1]), 0) + 1
    total: Tensor | None = None
    count = x.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            top, left = min(r * stride[0], H - ch), min(c * stride[1], W - cw)
            out = model(x[..., top : top + ch, left : left + cw])
            if total is None:
                total = x.new_zeros(1, out.shape[1], H, W)
            total[..., top : top + ch, left : left + cw] += out
            count[..., top : top + ch, left : left + cw] += 1
    assert total is not None
    return total / count


def align_resize(image: Tensor, scale: tuple[int, int], ratio: float = 1.0, align: int = 32) -> Tensor:
    """mmseg 0.13's ``AlignResize`` (the authors' test pipeline): ``[3, H, W]`` in 0..1 ->
    ``[1, 3, h, w]`` in 0..1, rescaled keeping the ratio into ``scale x ratio``, then resized again
    so that both sides are multiples of ``align``.

    An 8-bit image takes mmcv's path exactly: two OpenCV bilinear resizes of the uint8 image
    (``imrescale``, then ``imresize`` to the aligned size; ``cv2_resize_linear_u8``). Other images
    are resized once, bilinearly, to the aligned size.
    """
    H, W = image.shape[-2:]
    f = min(scale[0] * ratio / max(H, W), scale[1] * ratio / min(H, W))
    rescaled = (int(H * f + 0.5), int(W * f + 0.5))
    aligned = eval_size(H, W, scale, ratio, align)
    u8 = eight_bit_values(image)
    if u8 is None:
        return F.interpolate(image[None].float(), size=aligned, mode="bilinear", align_corners=False)
    for size in (rescaled, aligned):
        if tuple(u8.shape[-2:]) != size:
            u8 = cv2_resize_linear_u8(u8, size)
    return (u8 / 255)[None]


def infer(
    model: nn.Module,
    image: Tensor,
    *,
    scale: tuple[int, int] = (2048, 512),
    align: int = 32,
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    flip: bool = False,
    ratios: tuple[float, ...] = (1.0,),
) -> Tensor:
    """Class probabilities ``[C, H, W]`` at the image's own size for ``image [3, H, W]`` in 0..1.

    Each (ratio, flip) view is resized with :func:`align_resize`, run whole or in windows, resized
    back, soft-maxed and averaged, as mmseg's test-time augmentation.
    """
    return infer_batch(model, [image], scale=scale, align=align, mode=mode, crop=crop, stride=stride, flip=flip,
                       ratios=ratios)[0]  # fmt: skip


def infer_batch(
    model: nn.Module,
    images: list[Tensor],
    *,
    scale: tuple[int, int] = (2048, 512),
    align: int = 32,
    mode: str = "whole",
    crop: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    flip: bool = False,
    ratios: tuple[float, ...] = (1.0,),
) -> list[Tensor]:
    """:func:`infer` for several images: in ``whole`` mode the views that resize to the same size
    run through the model as one batch (a server's dynamic batches); one image is exactly ``infer``."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"data.eval_mode={mode!r}: expected 'whole' or 'slide'")
    probs: list[Tensor | None] = [None] * len(images)
    views = 0
    for ratio in ratios:
        resized = [align_resize(image, scale, ratio, align) for image in images]
        for flipped in (False, True) if flip else (False,):
            batch = [x.flip(-1) if flipped else x for x in resized]
            for i, logits in enumerate(_view_logits(model, batch, mode, crop, stride)):
                logits = logits.flip(-1) if flipped else logits
                size = images[i].shape[-2:]
                p = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(1)[0]
                prev = probs[i]
                probs[i] = p if prev is None else prev + p
            views += 1
    return [p / views for p in probs if p is not None]


def _view_logits(
    model: nn.Module, views: list[Tensor], mode: str, crop: tuple[int, int], stride: tuple[int, int]
) -> list[Tensor]:
    """Logits ``[1, C, h, w]`` of each view ``[1, 3, h, w]``; whole views of one size share a forward."""
    if mode == "slide":
        return [slide_logits(model, v, crop, stride) for v in views]
    out: dict[int, Tensor] = {}
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        by_size.setdefault(tuple(v.shape[-2:]), []).append(i)
    for members in by_size.values():
        logits = model(torch.cat([views[i] for i in members]))
        out.update({i: logits[j : j + 1] for j, i in enumerate(members)})
    return [out[i] for i in range(len(views))]


@torch.inference_mode()
def predict_labels(model: nn.Module, image: Tensor, **kwargs: object) -> Tensor:
    """``[H, W]`` int64 class indices for ``image [3, H, W]`` in 0..1 (see :func:`infer`)."""
    return infer(model, image, **kwargs).argmax(0)  # type: ignore[arg-type]
