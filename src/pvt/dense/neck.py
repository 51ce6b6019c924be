"""Checkpoint conversion of the neck the dense tasks share: mmdet / mmseg ``FPN`` -> torchvision's
``FeaturePyramidNetwork`` names."""

from __future__ import annotations

import re

from pvt.checkpoint.layouts import CheckpointError, StateDict

_NECK = re.compile(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$")


def convert_fpn_neck(sd: StateDict, detector: str, source: str) -> tuple[StateDict, list[str]]:
    """mmdet / mmseg ``FPN`` -> torchvision ``FeaturePyramidNetwork`` (+ RetinaNet's P6/P7 extra
    block); returns (tensors, used source keys). ``detector``: ``retinanet``, ``mask_rcnn`` or
    ``semantic_fpn`` (only RetinaNet has extra convs)."""
    lateral = {int(m.group(2)) for k in sd if (m := _NECK.match(k)) and m.group(1) == "lateral_convs"}
    n_in = len(lateral)
    if n_in == 0 or lateral != set(range(n_in)):
        raise CheckpointError(f"{source}: unknown neck layout (lateral convs {sorted(lateral)}); expected mmdet's FPN")
    out: StateDict = {}
    used: list[str] = []
    for k, v in sd.items():
        m = _NECK.match(k)
        if m is None:
            continue
        kind, i, param = m.group(1), int(m.group(2)), m.group(3)
        if kind == "lateral_convs":
            out[f"backbone.fpn.inner_blocks.{i}.0.{param}"] = v
        elif i < n_in:
            out[f"backbone.fpn.layer_blocks.{i}.0.{param}"] = v
        elif detector == "retinanet" and i in (n_in, n_in + 1):
            out[f"backbone.fpn.extra_blocks.{'p6' if i == n_in else 'p7'}.{param}"] = v
        else:
            raise CheckpointError(f"{source}: unknown neck tensor {k} for a {detector} ({n_in} FPN inputs)")
        used.append(k)
    return out, used
