"""Where the published PVT weights live, as data: one row per file (``/shared/reference/weights.md``).

A row names the registered backbone it belongs to (``model``), a ``tag`` unique per model, the
``task`` it was trained on (``imagenet``, ``coco``, ``ade20k``), the ``arch`` of the whole model
(``classifier``, ``retinanet``, ``mask_rcnn``, ``semantic_fpn``), how to fetch it (``host``:
``hf`` hub repository, ``url`` direct link, ``gdrive`` manual download only), its checksum where
one is known, the key layout of its backbone, its licence and its published metric. ImageNet rows
also carry the evaluation transform their published top-1 was measured with.

Hub rows ask for their file the way transformers and timm do: ``model.safetensors`` first, then
``pytorch_model.bin`` (``fallbacks``) when the repository has no safetensors file, so a repository
converted either way still loads. A row's ``sha256`` is that of its first file, ``filename``.

Nothing here touches the network; ``pvt.hub.download`` fetches a row's file.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from pvt.utils.constants import IMAGENET_MEAN, IMAGENET_STD

TASKS = ("imagenet", "coco", "ade20k")


@dataclass(frozen=True)
class EvalTransform:
    """Single-crop evaluation transform: resize the short side to ``input_size / crop_pct``, centre
    crop ``input_size`` (``crop_mode="center"``), or resize straight to ``input_size`` squared
    (``crop_mode="squash"``, HF image processors); then normalise with ``mean`` / ``std``."""

    input_size: int = 224
    crop_pct: float = 0.875
    crop_mode: str = "center"  # center | squash
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# The three ImageNet evaluation transforms (weights.md, "Eval transforms differ by source").
OFFICIAL_EVAL = EvalTransform(crop_pct=0.875, interpolation="bicubic")  # DeiT: resize 256, crop 224
TIMM_EVAL = EvalTransform(crop_pct=0.9, interpolation="bicubic")  # timm's pretrained_cfg
HF_EVAL = EvalTransform(crop_pct=1.0, crop_mode="squash", interpolation="bilinear")  # 224x224 resize


@dataclass(frozen=True)
class WeightsSource:
    """One published weights file and what is known about it."""

    model: str  # registered backbone name (pvt.list_models())
    tag: str  # unique per model: official | timm | hf | coco | coco-official | ...
    task: str  # imagenet | coco | ade20k
    arch: str  # classifier | retinanet | mask_rcnn | semantic_fpn
    host: str  # hf | url | gdrive
    location: str  # hf: repo id; url: the file's URL; gdrive: the page that links the file
    filename: str  # hf: the preferred file in the repo; url / gdrive: the name in $PVT_CACHE/weights
    sha256: str | None  # of ``filename``: full hex digest, or a known prefix of it, or None
    layout: str  # backbone key layout (pvt.checkpoint.LAYOUTS); dense files add their necks/heads
    license: str
    metrics: tuple[tuple[str, float], ...]  # (("top1", 82.0),), (("box_ap", 42.9), ("mask_ap", 39.5))
    num_classes: int
    eval_transform: EvalTransform | None = None  # ImageNet rows
    note: str = ""
    fallbacks: tuple[str, ...] = ()  # hf: files tried in order when the repo has no ``filename`` (404)

    @property
    def filenames(self) -> tuple[str, ...]:
        """The files asked for, in order: ``filename``, then ``fallbacks``."""
        return (self.filename, *self.fallbacks)

    @property
    def name(self) -> str:
        """``model:tag``, the name ``pvt download`` and ``get_source`` accept."""
        return f"{self.model}:{self.tag}"

    @property
    def short_tag(self) -> str:
        """The tag without its arch (``coco-mask-rcnn-official`` -> ``coco-official``): enough once
        the arch is known, as for ``mask_rcnn(..., pretrained="coco-official")``."""
        return self.tag.replace(f"-{self.arch.replace('_', '-')}", "")

    @property
    def url(self) -> str:
        """Where the file is fetched from (hf: ``filename``'s ``resolve/main`` URL on ``HF_ENDPOINT``'s host)."""
        return self.file_url(self.filename)

    def file_url(self, filename: str) -> str:
        """The URL of one of ``filenames`` (url / gdrive rows: ``location``, their only file)."""
        if self.host == "hf":
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            return f"{endpoint}/{self.location}/resolve/main/{filename}"
        return self.location

    def metric_text(self) -> str:
        names = {"top1": "top-1", "box_ap": "box AP", "mask_ap": "mask AP", "miou": "mIoU"}
        return ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in self.metrics)


_LICENSE = "Apache-2.0"
# What transformers' from_pretrained and timm ask a hub repository for, in this order.
_HF_FILE, _HF_FALLBACKS = "model.safetensors", ("pytorch_model.bin",)
_RELEASE = "https://github.com/whai362/PVT/releases/download/v2/{}"
_MMDET = "https://download.openmmlab.com/mmdetection/v2.0/pvt/{}/{}"
_DET_README = "https://github.com/whai362/PVT/tree/v2/detection"
_SEG_README = "https://github.com/whai362/PVT/tree/v2/segmentation"

# name: (published top-1, HF transformers repo, timm file sha256 prefix; "" = v1 (no timm weights))
_IMAGENET: dict[str, tuple[float, str, str | None]] = {
    "pvt_tiny": (75.1, "Zetatech/pvt-tiny-224", ""),
    "pvt_small": (79.8, "Zetatech/pvt-small-224", ""),
    "pvt_medium": (81.2, "Zetatech/pvt-medium-224", ""),
    "pvt_large": (81.7, "Zetatech/pvt-large-224", ""),
    "pvt_v2_b0": (70.5, "OpenGVLab/pvt_v2_b0", "d0927f8c"),
    "pvt_v2_b1": (78.7, "OpenGVLab/pvt_v2_b1", "0cb38d3d"),
    "pvt_v2_b2": (82.0, "OpenGVLab/pvt_v2_b2", "0bff520d"),
    "pvt_v2_b2_li": (82.1, "OpenGVLab/pvt_v2_b2_linear", None),
    "pvt_v2_b3": (83.1, "OpenGVLab/pvt_v2_b3", None),
    "pvt_v2_b4": (83.6, "OpenGVLab/pvt_v2_b4", None),
    "pvt_v2_b5": (83.8, "OpenGVLab/pvt_v2_b5", "070ea6f6"),
}

# mmdetection's model zoo: RetinaNet 1x (config stem, file stamp with the sha256 prefix, box AP).
_MMDET_RETINANET: dict[str, tuple[str, str, float]] = {
    "pvt_tiny": ("retinanet_pvt-t_fpn_1x_coco", "20210831_103110-17b566bd", 36.6),
    "pvt_small": ("retinanet_pvt-s_fpn_1x_coco", "20210906_142921-b6c94a5b", 40.4),
    "pvt_medium": ("retinanet_pvt-m_fpn_1x_coco", "20210831_103243-55effa1b", 41.7),
    "pvt_v2_b0": ("retinanet_pvtv2-b0_fpn_1x_coco", "20210831_103157-13e9aabe", 37.1),
    "pvt_v2_b1": ("retinanet_pvtv2-b1_fpn_1x_coco", "20210831_103318-7e169a7d", 41.2),
    "pvt_v2_b2": ("retinanet_pvtv2-b2_fpn_1x_coco", "20210901_174843-529f0b9a", 44.6),
    "pvt_v2_b3": ("retinanet_pvtv2-b3_fpn_1x_coco", "20210903_151512-8357deff", 46.0),
    "pvt_v2_b4": ("retinanet_pvtv2-b4_fpn_1x_coco", "20210901_170151-83795c86", 46.3),
    "pvt_v2_b5": ("retinanet_pvtv2-b5_fpn_1x_coco", "20210902_201800-3420eb57", 46.1),
}

# The authors' detection README (Google Drive): RetinaNet box AP, Mask R-CNN (box AP, mask AP).
_OFFICIAL_DET: dict[str, tuple[float, tuple[float, float]]] = {
    "pvt_tiny": (36.7, (36.7, 35.1)),
    "pvt_small": (40.4, (40.4, 37.8)),
    "pvt_medium": (41.9, (42.0, 39.0)),
    "pvt_large": (42.6, (42.9, 39.5)),
    "pvt_v2_b0": (37.2, (38.2, 36.2)),
    "pvt_v2_b1": (41.2, (41.8, 38.8)),
    "pvt_v2_b2_li": (43.6, (44.1, 40.5)),
    "pvt_v2_b2": (44.6, (45.3, 41.2)),
    "pvt_v2_b3": (45.9, (47.0, 42.5)),
    "pvt_v2_b4": (46.1, (47.5, 42.7)),
    "pvt_v2_b5": (46.2, (47.4, 42.5)),
}

# The authors' segmentation README (Google Drive): Semantic FPN on ADE20K, mIoU as in the repo.
_OFFICIAL_SEG = {"pvt_tiny": 36.6, "pvt_small": 41.9, "pvt_medium": 43.5, "pvt_large": 43.5}


def _imagenet_rows() -> list[WeightsSource]:
    rows = []
    for model, (top1, hf_repo, timm_sha) in _IMAGENET.items():
        metric = (("top1", top1),)
        rows.append(
            WeightsSource(model, "official", "imagenet", "classifier", "url", _RELEASE.format(f"{model}.pth"),
                          f"{model}.pth", None, "official", _LICENSE, metric, 1000, OFFICIAL_EVAL,
                          "the authors' release; the published top-1 was measured with this transform")
        )  # fmt: skip
        if timm_sha != "":
            rows.append(
                WeightsSource(model, "timm", "imagenet", "classifier", "hf", f"timm/{model}.in1k",
                              _HF_FILE, timm_sha, "timm", _LICENSE, metric, 1000, TIMM_EVAL,
                              "timm's copy of the official weights; top-1 as published (official transform)",
                              fallbacks=_HF_FALLBACKS)
            )  # fmt: skip
        v2 = model.startswith("pvt_v2")
        rows.append(
            WeightsSource(model, "hf", "imagenet", "classifier", "hf", hf_repo, _HF_FILE, None,
                          "hf_pvt_v2" if v2 else "hf_pvt", _LICENSE, metric, 1000, HF_EVAL,
                          "transformers' copy of the official weights; top-1 as published (official transform)",
                          fallbacks=_HF_FALLBACKS)
        )  # fmt: skip
    return rows


def _dense_rows() -> list[WeightsSource]:
    rows = []
    for model, (config, stamp, box_ap) in _MMDET_RETINANET.items():
        file = f"{config}_{stamp}.pth"
        rows.append(
            WeightsSource(model, "coco", "coco", "retinanet", "url", _MMDET.format(config, file), file,
                          stamp.rsplit("-", 1)[1], "mmdet", "Apache-2.0 (mmdetection; no per-model licence stated)",
                          (("box_ap", box_ap),), 80, note="mmdetection model zoo, RetinaNet 1x")
        )  # fmt: skip
    for model, (retina_ap, (box_ap, mask_ap)) in _OFFICIAL_DET.items():
        rows.append(
            WeightsSource(model, "coco-official", "coco", "retinanet", "gdrive", _DET_README,
                          f"retinanet_{model}_coco_official.pth", None, "official", _LICENSE,
                          (("box_ap", retina_ap),), 80, note="the authors' RetinaNet 1x (mmdet 2.13 layout)")
        )  # fmt: skip
        note = "the authors' Mask R-CNN 1x (mmdet 2.13 layout)"
        if model == "pvt_large":
            note += "; the README's link for this one points at the RetinaNet PVT-Large file (a README error)"
        rows.append(
            WeightsSource(model, "coco-mask-rcnn-official", "coco", "mask_rcnn", "gdrive", _DET_README,
                          f"mask_rcnn_{model}_coco_official.pth", None, "official", _LICENSE,
                          (("box_ap", box_ap), ("mask_ap", mask_ap)), 80, note=note)
        )  # fmt: skip
    for model, miou in _OFFICIAL_SEG.items():
        rows.append(
            WeightsSource(model, "ade20k-official", "ade20k", "semantic_fpn", "gdrive", _SEG_README,
                          f"semantic_fpn_{model}_ade20k_official.pth", None, "official", _LICENSE,
                          (("miou", miou),), 150, note="the authors' Semantic FPN 40k (mmseg 0.13 layout)")
        )  # fmt: skip
    return rows


SOURCES: tuple[WeightsSource, ...] = (*_imagenet_rows(), *_dense_rows())


def list_sources(pattern: str = "*", task: str | None = None) -> list[WeightsSource]:
    """Rows whose ``model`` or ``model:tag`` matches the shell-style ``pattern``, optionally of one task."""
    return [
        s
        for s in SOURCES
        if (fnmatch.fnmatchcase(s.model, pattern) or fnmatch.fnmatchcase(s.name, pattern))
        and (task is None or s.task == task)
    ]


def get_source(
    name: str,
    tag: str | None = None,
    task: str | None = "imagenet",
    arch: str | None = None,
) -> WeightsSource:
    """The row for ``name`` (or ``"name:tag"``) and ``tag``.

    With no tag: the default of ``task`` (and ``arch``): ``official`` for ImageNet where it exists,
    else the table's first matching row (downloadable rows come before Google-Drive ones). A tag
    equal to the task name (``"coco"``, ``"ade20k"``) also picks that task's default for ``arch``,
    and with ``arch`` given a tag may leave the arch out (``"coco-official"`` for ``mask_rcnn``).
    ``task=None`` searches every task (``pvt download NAME:TAG``).
    """
    if tag is None and ":" in name:
        name, tag = name.split(":", 1)
    rows = [s for s in SOURCES if s.model == name]
    if not rows:
        # pvt.create_model checks its registry first, so a registered name without rows ends here too.
        raise ValueError(f"no published weights for {name!r}; models with published weights: {', '.join(_models())}")
    scoped = [s for s in rows if (task is None or s.task == task) and (arch is None or s.arch == arch)]
    if tag is not None and tag != task:
        found = [s for s in scoped if s.tag == tag] or [s for s in scoped if arch and s.short_tag == tag]
        if found:
            return found[0]
    elif scoped:
        return next((s for s in scoped if s.tag == "official"), scoped[0])
    where = " ".join(x for x in (task or "", arch or "") if x) or "any task"
    available = ", ".join(f"{s.tag} ({s.task} {s.arch}, {s.host})" for s in rows)
    asked = f"tag {tag!r}" if tag is not None else "a default"
    raise ValueError(f"{name}: no {asked} for {where}; available tags: {available}")


def _models() -> list[str]:
    return list(dict.fromkeys(s.model for s in SOURCES))
