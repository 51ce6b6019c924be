"""``create_model``: the one way to build a registered PVT, optionally with weights."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pvt.models.base import PyramidBackbone
from pvt.models.registry import model_builder


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    checkpoint: str | os.PathLike[str] | Mapping[str, object] | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    drop_path_rate: float | None = None,
    strict: bool = True,
    **kwargs: object,
) -> PyramidBackbone:
    """Build a registered model (``pvt.list_models()``).

    Args:
        num_classes: classifier outputs; 0 for pooled features. Ignored with ``features_only``.
        checkpoint: a ``.pth``/``.bin``/``.safetensors`` path or a state dict in any supported
            layout (see ``pvt.load_checkpoint``); the load report is kept as ``model.load_report``.
        features_only: return ``[B, C_i, H/s_i, W/s_i]`` maps (strides 4, 8, 16, 32) for
            ``out_indices`` instead of logits; ``model.feature_info`` describes them.
        drop_path_rate: stochastic depth; None keeps 0.0 (the ImageNet recipe's rate per
            variant is ``pvt.model_card(name).drop_path_rate``).
        kwargs: architecture overrides, e.g. ``img_size=384`` (v1 position tables),
            ``in_chans``, ``drop_rate``, ``attn_drop_rate``, ``fused_attn``.
    """
    build = model_builder(name)
    model = build(
        num_classes=num_classes,
        features_only=features_only,
        out_indices=tuple(out_indices),
        drop_path_rate=0.0 if drop_path_rate is None else drop_path_rate,
        **kwargs,
    )
    assert isinstance(model, PyramidBackbone)
    model.arch = name
    if checkpoint is not None:
        from pvt.checkpoint import load_checkpoint  # beside the models; imported on use

        model.load_report = load_checkpoint(model, checkpoint, strict=strict)
    return model
