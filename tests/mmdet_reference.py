"""Committed mmdetection 3.3 reference outputs for the detection parity tests (no mmdetection needed).

``tests/reference/mmdet/<model>.pt`` holds what mmdetection's own RetinaNet / Mask R-CNN computed on CPU
(1 thread) for the seeded weights of ``weights.make_state_dict(model, seed)`` on the seeded images of
``images.make_images(seed)``; ``make_reference.py`` (run by hand with mmdetection installed) made them and
documents the format.  The tests rebuild the same weights and images with torch and numpy alone, run our
converted detector, and compare with the helpers below.

Models: ``retinanet_pvtv2_b0``, ``retinanet_pvt_s``, ``mask_rcnn_pvtv2_b0``, ``mask_rcnn_pvt_s``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

REF_DIR = Path(__file__).resolve().parent / "reference" / "mmdet"
MODELS = ("retinanet_pvtv2_b0", "retinanet_pvt_s", "mask_rcnn_pvtv2_b0", "mask_rcnn_pvt_s")
MMENGINE_META_SAMPLE = REF_DIR / "mmengine_meta_sample.pth"  # harness meta, plain types
MMENGINE_RUNNER_SAMPLE = REF_DIR / "mmengine_runner_sample.pth"  # Runner meta + message_hub etc.


def _load_module(name: str) -> ModuleType:
    """Import ``reference/mmdet/<name>.py`` under a private name (the folder is not a package, and putting
    it on sys.path could shadow the real ``mmdet`` package for tools that import it)."""
    full = f"_mmdet_reference_{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.spec_from_file_location(full, REF_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None, REF_DIR / f"{name}.py"
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    return mod


def reference(model: str) -> dict[str, Any]:
    """The reference of ``model`` (see make_reference.py's docstring for the keys), loaded with
    ``weights_only=True``."""
    path = REF_DIR / f"{model}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: known models {MODELS}; regenerate with make_reference.py")
    ref: dict[str, Any] = torch.load(path, weights_only=True)
    return ref


def state_dict(model: str, seed: int | None = None) -> dict[str, torch.Tensor]:
    """The mmdetection-layout weights the reference of ``model`` was made with, rebuilt with torch.

    Checks their sha256 against the reference, so a change in torch's RNG fails here, not as a confusing
    parity mismatch."""
    ref = reference(model)
    weights = _load_module("weights")
    sd: dict[str, torch.Tensor] = weights.make_state_dict(model, ref["seed"] if seed is None else seed)
    if seed is None and weights.state_dict_digest(sd) != ref["weights_sha256"]:
        raise AssertionError(
            f"{REF_DIR / 'weights.py'} no longer rebuilds the weights of {REF_DIR / (model + '.pt')} "
            f"(torch {torch.__version__} vs {ref['torch_version']} when it was made): regenerate the references "
            "with make_reference.py"
        )
    return sd


def images(seed: int = 0, expect_sha256: list[str] | None = None) -> list[np.ndarray]:
    """The test images, [H, W, 3] uint8 RGB (512x512, 384x640); pass a reference's ``image_sha256`` to
    check that they are the ones mmdetection saw."""
    imgs: list[np.ndarray] = _load_module("images").make_images(seed)
    if expect_sha256 is not None:
        got = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in imgs]
        if got != list(expect_sha256):
            raise AssertionError(
                f"{REF_DIR / 'images.py'} no longer draws the reference images (numpy {np.__version__}): "
                "regenerate the references with make_reference.py"
            )
    return imgs


def sampled(levels: list[torch.Tensor], sample: dict[str, Any]) -> list[torch.Tensor]:
    """Pick a reference's sampled raw outputs out of ours: ``levels`` are per-level [C, H, W] tensors in
    mmdet's layout (channel = anchor * num_classes + class, or anchor * 4 + k); returns per level the
    values at ``sample["index"]``, to compare with ``sample["values"]``."""
    if len(levels) != len(sample["shapes"]):
        raise ValueError(f"{len(levels)} levels, the reference has {len(sample['shapes'])}")
    out = []
    for lvl, (t, shape, idx) in enumerate(zip(levels, sample["shapes"], sample["index"], strict=True)):
        if list(t.shape) != list(shape):
            raise ValueError(f"level {lvl}: shape {list(t.shape)}, the reference has {shape} ([C, H, W])")
        out.append(t.reshape(-1)[idx])
    return out


def box_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pairwise IoU of [N, 4] and [M, 4] x1y1x2y2 boxes, in float64: [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    wh = (np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(
    ours: dict[str, Any], ref: dict[str, Any], iou: float = 0.999, score_tol: float = 1e-4
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """One-to-one matching of our detections with mmdet's (both dicts with ``boxes`` [N, 4] x1y1x2y2,
    ``scores`` [N], ``labels`` [N], tensors or arrays).

    Greedy over the reference detections by descending score: each takes, among our still unmatched
    detections with the same label, box IoU >= ``iou`` and |score difference| <= ``score_tol``, the one with
    the highest IoU.  Returns (matched (ref index, our index) pairs, unmatched ref indices, unmatched ours).
    """
    rb, ob = np.asarray(ref["boxes"]), np.asarray(ours["boxes"])
    rs, os_ = np.asarray(ref["scores"], dtype=np.float64), np.asarray(ours["scores"], dtype=np.float64)
    rl, ol = np.asarray(ref["labels"]), np.asarray(ours["labels"])
    ious = box_iou(rb, ob)
    ok = (rl[:, None] == ol[None, :]) & (ious >= iou) & (np.abs(rs[:, None] - os_[None, :]) <= score_tol)
    free = np.ones(len(os_), dtype=bool)
    matched: list[tuple[int, int]] = []
    unmatched_ref: list[int] = []
    for i in np.argsort(-rs, kind="stable"):
        cand = np.flatnonzero(ok[i] & free)
        if len(cand) == 0:
            unmatched_ref.append(int(i))
            continue
        j = int(cand[np.argmax(ious[i, cand])])
        free[j] = False
        matched.append((int(i), j))
    return matched, sorted(unmatched_ref), [int(j) for j in np.flatnonzero(free)]


def unpack_masks(image_ref: dict[str, Any]) -> np.ndarray:
    """mmdet's binary masks of one reference image (Mask R-CNN), as bool [N, H, W]."""
    m = image_ref["masks"]
    h, w = image_ref["height"], image_ref["width"]
    crop, off, bits = m["crop"].numpy(), m["offsets"].numpy(), m["bits"].numpy()
    out = np.zeros((len(crop), h, w), dtype=bool)
    for k, (y0, x0, ch, cw) in enumerate(crop):
        if ch and cw:
            flat = np.unpackbits(bits[off[k] : off[k + 1]], count=int(ch * cw)).astype(bool)
            out[k, y0 : y0 + ch, x0 : x0 + cw] = flat.reshape(ch, cw)
    return out


def mask_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """IoU of two binary [H, W] masks (1.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
