"""``create_model``: the one way to build a registered PVT, optionally with weights."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from pvt.models.base import PyramidBackbone
from pvt.models.registry import list_models, model_builder


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    pretrained: bool | str = False,
    checkpoint: str | os.PathLike[str] | Mapping[str, object] | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    drop_path_rate: float | None = None,
    strict: bool = True,
    allow_nonfinite: bool = False,
    **kwargs: object,
) -> PyramidBackbone:
    """Build a registered model (``pvt.list_models()``).

    Args:
        num_classes: classifier outputs; 0 for pooled features. Ignored with ``features_only``.
        pretrained: load the published ImageNet weights: True for the default source (the
            authors' release, ``official``), or a tag (``"timm"``, ``"hf"``; see
            ``pvt.hub.list_sources(name)``). The file is downloaded once (``pvt.hub.resolve``);
            the chosen ``pvt.hub.WeightsSource``, with its eval transform, is kept as
            ``model.pretrained_source``. A head of another class count starts fresh.
        checkpoint: a ``.pth``/``.bin``/``.safetensors`` path or a state dict in any supported
            layout (see ``pvt.load_checkpoint``); the load report is kept as ``model.load_report``.
            Weights holding NaN or Inf are refused unless ``allow_nonfinite=True``.
        features_only: return ``[B, C_i, H/s_i, W/s_i]`` maps (strides 4, 8, 16, 32) for
            ``out_indices`` instead of logits; ``model.feature_info`` describes them.
        drop_path_rate: stochastic depth; None keeps 0.0 (the ImageNet recipe's rate per
            variant is ``pvt.model_card(name).drop_path_rate``).
        kwargs: architecture overrides, e.g. ``img_size=384`` (v1 position tables),
            ``in_chans``, ``drop_rate``, ``attn_drop_rate``, ``fused_attn``.
    """
    if pretrained and checkpoint is not None:
        raise ValueError(
            f"create_model({name!r}): pass either pretrained= (published weights) or checkpoint= (a file), not both"
        )
    build = model_builder(name)  # an unknown name fails here, before any weights are looked up
    source = None
    if pretrained:
        from pvt.hub import get_source, resolve  # the hub is imported only when weights are asked for

        source = get_source(name, None if pretrained is True else str(pretrained), task="imagenet")
        checkpoint = resolve(source)
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

        model.load_report = load_checkpoint(model, checkpoint, strict=strict, allow_nonfinite=allow_nonfinite)
    model.pretrained_source = source
    return model


def model_for_weights(
    sd: Mapping[str, Any], source: str, *, arch: str | None = None, features_only: bool | None = None
) -> PyramidBackbone:
    """A PVT shaped like the weights ``sd`` (official layout; ``source`` names them in errors): the
    registered architecture they match (``arch`` says it instead), their class count, v1's training
    resolution; features-only when they have no head (``features_only`` decides instead). The
    weights are not loaded: ``load_checkpoint`` does that."""
    from pvt.checkpoint import CheckpointError, infer_arch

    arch = arch or infer_arch(sd)
    if arch is None:
        raise CheckpointError(
            f"{source}: could not tell which model these weights belong to; pass --arch "
            f"(one of {', '.join(list_models())})"
        )
    head = sd.get("head.weight")
    kwargs: dict[str, Any] = {}
    if "pos_embed1" in sd:  # v1: keep the checkpoint's own training resolution
        kwargs["img_size"] = 4 * round(sd["pos_embed1"].shape[1] ** 0.5)
    if features_only is None:
        features_only = head is None and "cls_token" not in sd
    return create_model(
        arch, num_classes=0 if head is None else int(head.shape[0]), features_only=features_only, **kwargs
    )
