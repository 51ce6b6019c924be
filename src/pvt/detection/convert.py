"""Whole-detector checkpoints: mmdetection's and the authors' files -> this project's detectors.

Sources read (``read_detector_checkpoint``), all with ``torch.load(weights_only=True)`` (mmengine /
mmcv metadata objects are read as inert stand-ins, never executed: ``pvt.checkpoint.io``):

* mmdetection 3.x and 2.x RetinaNet / Mask R-CNN with mmdet's own PVT (``backbone.layers.*``;
  LayerNorm eps 1e-6 in the patch-embedding and spatial-reduction norms);
* the authors' mmdet-2.13 releases (``backbone.`` + the official PVT names, eps 1e-5);
* this project's files (a run's ``model.safetensors``, or what ``convert_detector`` wrote).

mmdetection's names map to torchvision's one to one (harness README section 6.3 / 7):

=================================================  ==================================================
mmdet                                              here
=================================================  ==================================================
``backbone.*``                                     ``backbone.body.*`` (official names, via
                                                   ``pvt.checkpoint.to_official``)
``neck.lateral_convs.{i}.conv.*``                  ``backbone.fpn.inner_blocks.{i}.0.*``
``neck.fpn_convs.{i}.conv.*`` (i < inputs)         ``backbone.fpn.layer_blocks.{i}.0.*``
``neck.fpn_convs.{n}|{n+1}.conv.*`` (RetinaNet)    ``backbone.fpn.extra_blocks.p6|p7.*``
``bbox_head.cls_convs.{i}.conv.*``                 ``head.classification_head.conv.{i}.0.*``
``bbox_head.reg_convs.{i}.conv.*``                 ``head.regression_head.conv.{i}.0.*``
``bbox_head.retina_cls.*`` / ``retina_reg.*``      ``head.classification_head.cls_logits.*`` /
                                                   ``head.regression_head.bbox_reg.*``
``rpn_head.*`` / ``roi_head.*``                    ``mmdet_rcnn.convert_rcnn_heads``
=================================================  ==================================================

Both libraries lay the RetinaNet outputs out anchor-major (class channel ``a * K + c``, box
channel ``a * 4 + k``, torchvision's ``view(N, A, K, H, W)``), with the same anchor order, so no
channel is permuted. Every source tensor is mapped or named in ``ConversionReport.ignored`` with
the reason; an unknown key, an unknown head layout or a class-count mismatch is an error naming
the file.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pvt.checkpoint.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    openmmlab_class_names,
    read_checkpoint,
    read_checkpoint_object,
    save_safetensors,
)
from pvt.checkpoint.layouts import CheckpointError, StateDict, detect_layout, strip_module_prefix, to_official, unwrap
from pvt.checkpoint.loader import check_finite, infer_arch, misfit
from pvt.dense.neck import convert_fpn_neck
from pvt.layers.blocks import EMBED_NORM_EPS, MMDET_EMBED_NORM_EPS

# Backbone tensors an ImageNet classifier has and a detection backbone does not.
_CLASSIFIER_ONLY = re.compile(r"^(head\.|cls_token$|norm\.(weight|bias)$)")
_RETINA_CONV = re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$")
_RETINA_OUT = re.compile(r"^bbox_head\.(retina_cls|retina_reg)\.(weight|bias)$")
_RETINA_HEAD_CONVS = 4  # torchvision's RetinaNetHead and mmdet's RetinaHead(stacked_convs=4)


@dataclass
class ConversionReport:
    """What happened to every tensor of the source file."""

    source: str
    mapped: int = 0
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why it is not loaded

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.mapped} tensors mapped, {len(self.ignored)} ignored"]
        lines += [f"  ignored {k}: {why}" for k, why in self.ignored.items()]
        return "\n".join(lines)


@dataclass
class DetectorCheckpoint:
    """A whole detector in this project's (torchvision) names, with what the source says about itself."""

    source: str
    detector: str  # retinanet | mask_rcnn
    backbone: str  # registered PVT name
    num_classes: int
    embed_norm_eps: float
    semantics: str  # "mmdet" for mmdetection / authors' files; this project's files say theirs
    state_dict: StateDict
    source_format: str  # mmdet | official (authors' mmdet 2.13) | pvt-vision
    class_names: list[str] | None = None
    report: ConversionReport = field(default_factory=lambda: ConversionReport(""))

    def check(self, detector: str, backbone: str, num_classes: int) -> None:
        """Refuse to build another detector, backbone or class count than the file holds."""
        if detector != self.detector:
            raise CheckpointError(
                f"{self.source}: a {self.detector} checkpoint, not a {detector}; use pvt.detection.{self.detector}"
            )
        if backbone != self.backbone:
            raise CheckpointError(
                f"{self.source}: its backbone is {self.backbone}, but {backbone} was requested; "
                f"build {self.detector}({self.backbone!r}, checkpoint=...)"
            )
        if num_classes != self.num_classes:
            raise CheckpointError(
                f"{self.source}: the detector has {self.num_classes} classes, but num_classes={num_classes} "
                f"was requested; pass num_classes={self.num_classes} (to fine-tune on other classes, load "
                "its backbone with backbone_checkpoint= instead)"
            )

    def settings(self, semantics: str | None, embed_norm_eps: float | None) -> tuple[str, float]:
        """(semantics, eps) to build this file's detector with: the caller's where given, else the
        file's. A caller's semantics that differ from the file's are used, with a warning: the
        weights load either way, but the test-time arithmetic is not the one they were made with."""
        if semantics is not None and semantics != self.semantics:
            warnings.warn(
                f"{self.source}: built with semantics={semantics!r}, but the file's detector computes with "
                f"{self.semantics!r} (set model.semantics={self.semantics} / semantics={self.semantics!r} for that)",
                stacklevel=3,
            )
        return semantics or self.semantics, self.embed_norm_eps if embed_norm_eps is None else embed_norm_eps

    def load_into(self, model: nn.Module, *, allow_nonfinite: bool = False) -> None:
        """Load every tensor into ``model`` exactly (same keys, same shapes) or raise naming the file;
        NaN / Inf tensors are refused unless ``allow_nonfinite`` (``pvt.checkpoint.loader.check_finite``)."""
        problems = misfit(model.state_dict(), self.state_dict)
        if problems:
            raise CheckpointError(
                f"{self.source}: does not fit {getattr(model, 'arch', type(model).__name__)}: {problems}"
                " (a different fpn_channels, head_norm or head_width than the file's?)"
            )
        if not allow_nonfinite:
            check_finite(self.state_dict, self.source)
        model.load_state_dict(self.state_dict)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata ``convert_detector`` writes (strings only)."""
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "arch": f"{self.detector}_{self.backbone}",
            "detector": self.detector,
            "backbone": self.backbone,
            "num_classes": str(self.num_classes),
            "semantics": self.semantics,
            "embed_norm_eps": repr(self.embed_norm_eps),
            "converted_from": Path(self.source).name,
        }
        if self.class_names:
            meta["classes"] = json.dumps(self.class_names)
        return meta


def _convert_backbone(sd: StateDict, source: str, report: ConversionReport) -> tuple[StateDict, str, str]:
    """``backbone.*`` tensors -> (``backbone.body.*`` official names, arch, layout)."""
    body = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    if not body:
        raise CheckpointError(f"{source}: no backbone.* tensors; not a whole detector checkpoint")
    try:
        layout = detect_layout(body)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: backbone: {e}") from e
    official = to_official(body, layout)
    for k in list(official):
        if _CLASSIFIER_ONLY.match(k):
            report.ignored[f"backbone.{k}"] = "ImageNet classifier tensor; a detection backbone has none"
            del official[k]
    arch = infer_arch(official)
    if arch is None:
        raise CheckpointError(
            f"{source}: the backbone ({layout} layout, {len(official)} tensors, e.g. {list(official)[:3]}) "
            "matches no registered PVT; see pvt.list_models()"
        )
    return {f"backbone.body.{k}": v for k, v in official.items()}, arch, layout


def _convert_retina_head(sd: StateDict, source: str) -> tuple[StateDict, list[str], int]:
    """mmdet ``RetinaHead`` -> torchvision ``RetinaNetHead``; returns (tensors, used keys, classes)."""
    out: StateDict = {}
    used: list[str] = []
    convs: dict[str, set[int]] = {"cls": set(), "reg": set()}
    for k, v in sd.items():
        if m := _RETINA_CONV.match(k):
            branch = "classification_head" if m.group(1) == "cls" else "regression_head"
            convs[m.group(1)].add(int(m.group(2)))
            out[f"head.{branch}.conv.{m.group(2)}.0.{m.group(3)}"] = v
            used.append(k)
        elif m := _RETINA_OUT.match(k):
            name = "classification_head.cls_logits" if m.group(1) == "retina_cls" else "regression_head.bbox_reg"
            out[f"head.{name}.{m.group(2)}"] = v
            used.append(k)
    if any(c != set(range(_RETINA_HEAD_CONVS)) for c in convs.values()):
        found = {b: sorted(c) for b, c in convs.items()}
        raise CheckpointError(
            f"{source}: unknown RetinaNet head layout: stacked convs {found}, expected "
            f"{_RETINA_HEAD_CONVS} plain conv3x3 + ReLU per branch (no norm)"
        )
    cls_w, reg_w = sd.get("bbox_head.retina_cls.weight"), sd.get("bbox_head.retina_reg.weight")
    if cls_w is None or reg_w is None or reg_w.shape[0] % 4:
        raise CheckpointError(f"{source}: RetinaNet head without retina_cls / retina_reg weights")
    anchors = reg_w.shape[0] // 4
    if anchors != 9 or cls_w.shape[0] % anchors:
        raise CheckpointError(
            f"{source}: unknown RetinaNet head layout: {anchors} anchors per location and "
            f"{cls_w.shape[0]} class channels (expected 9 anchors: 3 ratios x 3 octave scales)"
        )
    return out, used, cls_w.shape[0] // anchors


def _mask_rcnn_classes(sd: StateDict, source: str) -> int:
    w = sd.get("roi_head.bbox_head.fc_cls.weight")
    if w is None:
        raise CheckpointError(f"{source}: Mask R-CNN without roi_head.bbox_head.fc_cls (a class-agnostic head?)")
    if not any(k.startswith("roi_head.mask_head.") for k in sd):
        raise CheckpointError(f"{source}: a two-stage detector without a mask head (Faster R-CNN) is not supported")
    return int(w.shape[0]) - 1  # background last


def convert_mmdet_detector(
    sd: Mapping[str, Tensor], source: str = "state dict", class_names: list[str] | None = None
) -> DetectorCheckpoint:
    """An mmdetection (2.x / 3.x, or the authors' 2.13) detector state dict -> ``DetectorCheckpoint``."""
    sd, _ = strip_module_prefix(dict(sd))
    report = ConversionReport(source)
    if any(k.startswith("bbox_head.retina_cls.") for k in sd):
        detector = "retinanet"
    elif any(k.startswith("rpn_head.") for k in sd) and any(k.startswith("roi_head.") for k in sd):
        detector = "mask_rcnn"
    else:
        heads = sorted({k.split(".", 1)[0] for k in sd if not k.startswith(("backbone.", "neck."))})
        raise CheckpointError(
            f"{source}: unknown detector head layout (top-level modules {heads}); supported: mmdetection "
            "RetinaNet (bbox_head.retina_cls) and Mask R-CNN (rpn_head + roi_head)"
        )
    out, arch, layout = _convert_backbone(sd, source, report)
    neck, used = convert_fpn_neck(sd, detector, source)
    out.update(neck)
    if detector == "retinanet":
        head, head_used, num_classes = _convert_retina_head(sd, source)
    else:
        from pvt.detection.mmdet_rcnn import convert_rcnn_heads

        num_classes = _mask_rcnn_classes(sd, source)
        try:
            head, head_used = convert_rcnn_heads(sd, num_classes)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from e
    out.update(head)
    used += head_used
    report.mapped = len(sd) - len(report.ignored)
    unknown = [k for k in sd if not k.startswith("backbone.") and k not in set(used)]
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensors of the {detector} are not understood (e.g. {unknown[:4]}); "
            "the converter maps mmdetection's RetinaNet / Mask R-CNN with FPN only"
        )
    if class_names is not None and len(class_names) != num_classes:
        class_names = None  # metadata of another dataset than the head: trust the head
    return DetectorCheckpoint(
        source=source,
        detector=detector,
        backbone=arch,
        num_classes=num_classes,
        embed_norm_eps=MMDET_EMBED_NORM_EPS if layout == "mmdet" else EMBED_NORM_EPS,
        semantics="mmdet",
        state_dict=out,
        source_format="mmdet" if layout == "mmdet" else layout,
        class_names=class_names,
        report=report,
    )


def _is_own_layout(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("backbone.body.") for k in sd)


def own_detector_checkpoint(sd: StateDict, meta: Mapping[str, str], source: str) -> DetectorCheckpoint:
    """This project's detector file (torchvision names) -> ``DetectorCheckpoint`` (kept as it is)."""
    if "head.classification_head.cls_logits.weight" in sd:
        detector = "retinanet"
        anchors = sd["head.regression_head.bbox_reg.weight"].shape[0] // 4
        num_classes = sd["head.classification_head.cls_logits.weight"].shape[0] // anchors
    elif "roi_heads.box_predictor.cls_score.weight" in sd:
        detector = "mask_rcnn"
        num_classes = sd["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    else:
        raise CheckpointError(f"{source}: a backbone.body.* file without a RetinaNet or Mask R-CNN head")
    body = {k[len("backbone.body.") :]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    # convert_detector writes "backbone"; a run's model.safetensors has "arch" = "<detector>_<backbone>"
    # (which also names ResNet baselines); otherwise the backbone is recognised by its tensors.
    named = meta.get("arch", "")
    arch = meta.get("backbone") or (named[len(detector) + 1 :] if named.startswith(f"{detector}_") else None)
    arch = arch or infer_arch(body)
    if arch is None:
        raise CheckpointError(f"{source}: its backbone matches no registered PVT and the file does not name it")
    names = json.loads(meta["classes"]) if meta.get("classes") else None
    return DetectorCheckpoint(
        source=source,
        detector=meta.get("detector", detector),
        backbone=arch,
        num_classes=int(meta.get("num_classes", num_classes)),
        embed_norm_eps=float(meta.get("embed_norm_eps", EMBED_NORM_EPS)),
        semantics=meta.get("semantics", "torchvision"),
        state_dict=dict(sd),
        source_format=FORMAT_NAME,
        class_names=names,
        report=ConversionReport(source, mapped=len(sd)),
    )


def read_detector_checkpoint(path: str | os.PathLike[str]) -> DetectorCheckpoint:
    """Read any supported whole-detector file (see the module docstring); never executes pickled code."""
    p = Path(path)
    if p.suffix == ".safetensors":
        sd, meta = read_checkpoint(p)
        obj: Any = None
    else:
        obj = read_checkpoint_object(p)
        sd, meta = unwrap(obj, str(p)), {}
    sd, _ = strip_module_prefix(sd)
    if _is_own_layout(sd):
        return own_detector_checkpoint(sd, meta, str(p))
    if not any(k.startswith(("neck.", "bbox_head.", "rpn_head.", "roi_head.")) for k in sd):
        _refuse_backbone_only(sd, str(p))
    return convert_mmdet_detector(sd, str(p), openmmlab_class_names(obj))


def _refuse_backbone_only(sd: StateDict, source: str) -> None:
    """A file with no detector neck or head: name what it is and where it goes instead."""
    try:
        layout = detect_layout({k.removeprefix("backbone."): v for k, v in sd.items()})
    except CheckpointError:
        return  # not a backbone either: the detector converter says what it expected
    raise CheckpointError(
        f"{source}: a {layout}-layout backbone checkpoint, not a whole detector (no neck or head tensors); "
        "for backbone weights use model.backbone_checkpoint (backbone_checkpoint=)"
    )


def convert_detector(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, allow_nonfinite: bool = False
) -> DetectorCheckpoint:
    """Convert a whole-detector file to this project's safetensors (written atomically), with
    metadata: detector, backbone, num_classes, semantics, embed_norm_eps and class names. Weights
    holding NaN / Inf are refused unless ``allow_nonfinite``."""
    ckpt = read_detector_checkpoint(src)
    if not allow_nonfinite:
        check_finite(ckpt.state_dict, str(src))
    meta = ckpt.metadata()
    save_safetensors(ckpt.state_dict, dst, arch=meta.pop("arch"), metadata=meta)
    return ckpt


__all__ = [
    "ConversionReport",
    "DetectorCheckpoint",
    "convert_detector",
    "convert_fpn_neck",
    "convert_mmdet_detector",
    "own_detector_checkpoint",
    "read_detector_checkpoint",
]
