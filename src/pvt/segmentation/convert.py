"""Whole Semantic FPN checkpoints from mmsegmentation (the authors' ADE20K releases) -> this project.

The authors trained their Semantic FPN models with mmseg 0.13 (``EncoderDecoder`` with the official
PVT backbone, mmseg's ``FPN`` neck and ``FPNHead``). Their files hold:

* ``backbone.*``      the official PVT names (or mmdet/mmseg's own ``layers.*`` PVT layout)
* ``neck.lateral_convs.{i}.conv.*`` / ``neck.fpn_convs.{i}.conv.*``   the FPN (4 outputs, no extra level)
* ``decode_head.scale_heads.{i}.{j}.conv.weight`` / ``.bn.*``          FPNHead: ConvModules at even ``j``,
  an ``Upsample`` (no weights) at odd ``j`` for strides above 4
* ``decode_head.conv_seg.*``                                           the 1x1 classifier

``convert_semantic_fpn`` renames every tensor to :class:`pvt.segmentation.SemanticFPN`'s names, or
refuses: every source tensor is mapped or named as deliberately ignored (``auxiliary_head``, only
used in training), and an unknown key, a layout it cannot place or a class-count mismatch is an
error that names the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from pvt.checkpoint import CheckpointError, LoadReport, detect_layout, infer_arch, load_checkpoint, to_official
from pvt.checkpoint.layouts import strip_module_prefix, unwrap
from pvt.checkpoint.loader import check_finite, misfit
from pvt.dense.neck import convert_fpn_neck
from pvt.layers.blocks import EMBED_NORM_EPS, MMDET_EMBED_NORM_EPS

_IGNORED_PREFIXES = {"auxiliary_head.": "auxiliary head (training-only loss branch)"}
_HEAD = re.compile(r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.(conv|bn)\.(\w+)$")
_SEG = re.compile(r"^decode_head\.conv_seg\.(weight|bias)$")


@dataclass
class SegmenterCheckpoint:
    """A whole Semantic FPN in this project's names, with what the source said about itself."""

    source: str
    backbone: str | None  # registered PVT name of the backbone (None: a ResNet, in this project's files)
    backbone_layout: str  # official | mmdet | ...
    num_classes: int
    embed_norm_eps: float
    state_dict: dict[str, Tensor]
    class_names: list[str] | None = None
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why it was not loaded


def is_mmseg_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("decode_head.") for k in sd)


def convert_semantic_fpn(
    sd: Mapping[str, Tensor], source: str = "state dict", class_names: list[str] | None = None
) -> SegmenterCheckpoint:
    """mmseg ``EncoderDecoder`` (FPN + FPNHead) state dict -> ``SemanticFPN`` state dict."""
    if not is_mmseg_layout(sd):
        raise CheckpointError(f"{source}: not an mmsegmentation segmenter (no decode_head.* tensors)")
    ignored: dict[str, str] = {}
    backbone: dict[str, Tensor] = {}
    out, used = convert_fpn_neck(dict(sd), "semantic_fpn", source)
    neck_keys = set(used)
    unknown: list[str] = []
    for k, v in sd.items():
        if k in neck_keys:
            continue
        if k.startswith("backbone."):
            backbone[k[len("backbone.") :]] = v
        elif why := next((w for p, w in _IGNORED_PREFIXES.items() if k.startswith(p)), None):
            ignored[k] = why
        elif m := _HEAD.match(k):
            # mmseg: ConvModule at even j (Upsample at odd j); ours: conv, bn, relu[, upsample] per step.
            i, j, part, name = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            if j % 2:
                unknown.append(k)
                continue
            idx = 2 * j + (1 if part == "bn" else 0)
            if part == "conv" and name != "weight":
                unknown.append(k)  # FPNHead's convs have no bias (a norm follows)
                continue
            out[f"head.scale_heads.{i}.{idx}.{name}"] = v
        elif m := _SEG.match(k):
            out[f"head.classifier.{m.group(1)}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensors of an unknown Semantic FPN layout (e.g. {', '.join(unknown[:3])}); "
            "expected mmseg's FPN neck and FPNHead (the authors' sem_fpn configs)"
        )
    if "head.classifier.weight" not in out:
        raise CheckpointError(f"{source}: no decode_head.conv_seg classifier; not a whole segmenter")
    if not backbone:
        raise CheckpointError(f"{source}: no backbone.* tensors; not a whole segmenter")
    layout = detect_layout(backbone)
    official = to_official(backbone, layout)
    arch = infer_arch(official)
    if arch is None:
        raise CheckpointError(
            f"{source}: its {layout}-layout backbone matches no registered PVT (see pvt.list_models())"
        )
    out.update({f"backbone.body.{k}": v for k, v in official.items()})
    num_classes = int(out["head.classifier.weight"].shape[0])
    if class_names is not None and len(class_names) != num_classes:
        class_names = None  # a meta that does not describe this head is not trusted
    # mmdet / mmseg's own PVT uses eps 1e-6 in the patch-embedding and SR norms; the official 1e-5.
    eps = MMDET_EMBED_NORM_EPS if layout == "mmdet" else EMBED_NORM_EPS
    return SegmenterCheckpoint(source, arch, layout, num_classes, eps, out, class_names, ignored)


def load_semantic_fpn(model: nn.Module, ckpt: SegmenterCheckpoint, *, allow_nonfinite: bool = False) -> LoadReport:
    """Load a converted checkpoint into a ``SemanticFPN`` built for its backbone and class count.

    The backbone goes through the strict PVT loader (its report is returned: position tables
    resized to the model's grid, v1's unused classification tensors named); the FPN and head must
    match exactly. NaN / Inf tensors are refused, naming the file, unless ``allow_nonfinite``.
    """
    if not allow_nonfinite:
        check_finite(ckpt.state_dict, ckpt.source)
    body = {k[len("backbone.body.") :]: v for k, v in ckpt.state_dict.items() if k.startswith("backbone.body.")}
    rest = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("backbone.body.")}
    # Already checked above, under the file's name (the backbone loader sees a bare state dict).
    report = load_checkpoint(model.backbone.body, body, strict=True, allow_nonfinite=True)  # type: ignore[union-attr,arg-type]
    report.source, report.layout = ckpt.source, f"mmseg ({ckpt.backbone_layout} backbone)"
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.body.")}
    problems = misfit(target, rest)
    if problems:
        raise CheckpointError(
            f"{ckpt.source}: the FPN / head do not fit a Semantic FPN on {ckpt.backbone} with "
            f"{ckpt.num_classes} classes ({problems}); build it with the checkpoint's fpn_channels / head_channels"
        )
    model.load_state_dict(rest, strict=False)
    report.ignored = [f"{k} ({why})" for k, why in ckpt.ignored.items()]
    return report


def read_whole_segmenter(path: str) -> SegmenterCheckpoint:
    """A whole Semantic FPN file (``weights_only=True``): the authors' / mmseg's layout, converted,
    or this project's own (a run's ``model.safetensors`` or ``pvt convert``'s output)."""
    from pvt.checkpoint.io import FORMAT_NAME, openmmlab_class_names, read_checkpoint, read_checkpoint_object

    meta: dict[str, str] = {}
    if str(path).endswith(".safetensors"):
        sd, meta = read_checkpoint(path)
        names = json.loads(meta["classes"]) if meta.get("classes") else None
    else:
        obj = read_checkpoint_object(path)
        sd, _ = strip_module_prefix(unwrap(obj, str(path)))
        names = openmmlab_class_names(obj)
    if is_mmseg_layout(sd):
        return convert_semantic_fpn(sd, str(path), names)
    if "head.classifier.weight" not in sd or not any(k.startswith("backbone.body.") for k in sd):
        raise CheckpointError(
            f"{path}: not a whole Semantic FPN (no decode_head.* or head.classifier / backbone.body.* "
            "tensors); for backbone weights use backbone_checkpoint"
        )
    body = {k[len("backbone.body.") :]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    # convert_segmenter writes "backbone"; a run's model.safetensors "arch" = "semantic_fpn_<backbone>"
    # (which also names ResNets); else the PVT is recognised by its tensors.
    named = meta.get("arch", "")
    arch = meta.get("backbone") or (named[len("semantic_fpn_") :] if named.startswith("semantic_fpn_") else None)
    arch = arch or infer_arch(body)
    num_classes = int(sd["head.classifier.weight"].shape[0])
    return SegmenterCheckpoint(
        source=str(path),
        backbone=arch,
        backbone_layout=FORMAT_NAME,
        num_classes=num_classes,
        embed_norm_eps=float(meta.get("embed_norm_eps", EMBED_NORM_EPS)),
        state_dict=sd,
        class_names=names if names and len(names) == num_classes else None,
    )
