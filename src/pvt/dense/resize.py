"""OpenCV-exact bilinear resize of 8-bit images (``cv2.resize(..., INTER_LINEAR)``), which the
authors' mmdetection / mmsegmentation pipelines apply before normalising; used by both dense tasks."""

from __future__ import annotations

import torch
from torch import Tensor


def _cv2_taps(src: int, dst: int) -> tuple[Tensor, Tensor, Tensor]:
    """OpenCV ``resize`` INTER_LINEAR taps along one axis: first source index, its fractional
    weight (float32, as OpenCV computes it) and the unclamped index (resize.cpp, ``resize``)."""
    scale = 1.0 / (dst / src)  # OpenCV: scale_x = 1. / inv_scale_x, inv_scale_x = dst / src
    f = ((torch.arange(dst, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    s = torch.floor(f).to(torch.int64)
    return s, f - s.to(torch.float32), s


def _fixed(w: Tensor) -> Tensor:
    """``saturate_cast<short>(w * INTER_RESIZE_COEF_SCALE)``: round half to even, 11 fraction bits."""
    return torch.round(w * 2048).to(torch.int64)


def eight_bit_values(image: Tensor) -> Tensor | None:
    """A 0..1 float image -> its 0..255 values as exact integers (float32) when it came from an
    8-bit file (every value within 1e-3 of an integer step; ``to_dtype(scale=True)`` is not
    exactly invertible), else None."""
    x = image.to(torch.float32) * 255
    r = x.round()
    return r if bool(((x - r).abs() <= 1e-3).all()) else None


def cv2_resize_linear_u8(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``cv2.resize(uint8, INTER_LINEAR)`` bit-exactly: 0..255 integral ``[C, H, W]`` -> float32
    ``[C, h, w]`` of integers (what mmcv's ``imrescale`` gives mmdet's pipeline).

    OpenCV resizes 8-bit images in fixed point: 11-bit weights, a horizontal pass into int32 rows,
    then a vertical pass whose SIMD kernel (``VResizeLinearVec_32s8u``) computes
    ``((r0 >> 4) * b0 >> 16) + ((r1 >> 4) * b1 >> 16)`` rounded by ``(x + 2) >> 2``. Horizontal
    taps outside the image collapse onto the border pixel, vertical rows are clamped. An exact
    2x downscale is OpenCV's INTER_AREA fast path, ``(a + b + c + d + 2) >> 2``. Checked equal to
    OpenCV 4.x on up- and downscales (tests/reference/opencv/resize_linear.pt).
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    nh, nw = size
    img = image.to(torch.int64)
    if nh * 2 == h and nw * 2 == w:
        quad = img[:, 0::2, 0::2] + img[:, 0::2, 1::2] + img[:, 1::2, 0::2] + img[:, 1::2, 1::2]
        return ((quad + 2) >> 2).to(torch.float32)
    sx, fx, _ = _cv2_taps(w, nw)
    low, high = sx < 0, sx >= w - 1
    fx = torch.where(low | high, torch.zeros_like(fx), fx)
    sx = sx.clamp(0, w - 1)
    a0, a1 = _fixed(1 - fx), _fixed(fx)
    rows = img[:, :, sx] * a0 + img[:, :, (sx + 1).clamp(max=w - 1)] * a1  # [C, H, nw], value * 2048
    sy, fy, _ = _cv2_taps(h, nh)
    b0, b1 = _fixed(1 - fy)[:, None], _fixed(fy)[:, None]
    r0, r1 = rows[:, sy.clamp(0, h - 1)], rows[:, (sy + 1).clamp(0, h - 1)]  # [C, nh, nw]
    out = ((((r0 >> 4) * b0) >> 16) + (((r1 >> 4) * b1) >> 16) + 2) >> 2
    return out.clamp(0, 255).to(torch.float32)
