"""Semantic FPN (Kirillov et al. 2019) on PVT or torchvision's ResNets, as in the papers' mmseg setup.

Wiring (pvt-facts section 5, ``fpn_pvt_*_ade20k_40k.py``): C2-C5 into a 256-channel FPN with 4
outputs (torchvision's ``FeaturePyramidNetwork``, no extra level), then mmseg's ``FPNHead``: per
level a stack of max(1, log2(stride / 4)) 3x3 conv-BN-ReLU blocks of 128 channels, each followed by
a 2x bilinear upsampling for strides above 4, summed at stride 4, dropout 0.1 and a 1x1 classifier.
The logits are upsampled to the input size.

Deliberate differences, each a named argument: ``norm`` (BatchNorm; the task turns it into
SyncBatchNorm under multi-GPU DDP, as mmseg's SyncBN), ``fpn_channels`` / ``head_channels``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt.checkpoint import CheckpointError, LoadReport
from pvt.checkpoint.io import FORMAT_NAME, save_safetensors
from pvt.checkpoint.loader import check_finite, load_whole_model
from pvt.dense.fpn import BackboneFPN, backbone_fpn
from pvt.segmentation.convert import SegmenterCheckpoint, load_semantic_fpn, read_whole_segmenter
from pvt.utils.constants import IMAGENET_MEAN, IMAGENET_STD

STRIDES = (4, 8, 16, 32)
HUB_TASK = "ade20k"  # the published-weights table's rows of whole segmenters


class SemanticFPNHead(nn.Module):
    """mmseg ``FPNHead``: four FPN maps ``[B, C_fpn, H/s, W/s]`` -> logits ``[B, classes, H/4, W/4]``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 128,
        dropout: float = 0.1,
        strides: tuple[int, ...] = STRIDES,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for s in strides:
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(s) - math.log2(strides[0])))):
                layers += [
                    nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                    norm(channels),
                    nn.ReLU(inplace=True),
                ]
                if s != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():  # mmseg: kaiming for the convs, normal(0, 0.01) for the classifier
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)  # type: ignore[arg-type]

    def forward(self, feats: list[Tensor]) -> Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:], strict=True):
            # Odd map sizes make 2x upsampling miss stride 4 by a pixel: resize to it, as mmseg does.
            out = out + F.interpolate(head(f), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone + FPN + head. ``[B, 3, H, W]`` RGB in 0..1 -> logits ``[B, num_classes, H, W]``.

    Normalisation (ImageNet mean / std) happens inside, so callers pass plain images.
    """

    pixel_mean: Tensor
    pixel_std: Tensor
    # What optimize_for_inference runs in bf16: the PVT with its FPN, and the head (resizing stays fp32).
    bf16_parts = ("backbone", "head")

    def __init__(self, backbone: BackboneFPN, head: SemanticFPNHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.head.classifier.out_channels)

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.pixel_mean) / self.pixel_std
        feats = list(self.backbone(x).values())  # strides 4, 8, 16, 32
        logits = self.head(feats)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def semantic_fpn(
    backbone: str = "pvt_small",
    num_classes: int = 150,
    *,
    backbone_checkpoint: str | None = None,
    backbone_pretrained: bool | str = False,
    drop_path_rate: float = 0.1,
    freeze_stages: int = 0,
    fpn_channels: int = 256,
    head_channels: int = 128,
    dropout: float = 0.1,
    norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    checkpoint: str | SegmenterCheckpoint | None = None,
    pretrained: bool | str = False,
    allow_nonfinite: bool = False,
) -> SemanticFPN:
    """Semantic FPN on any registered PVT or ``resnet18`` / ``resnet50`` / ``resnet101``.

    ``num_classes`` counts the classes scored (150 for ADE20K, whose "other" label is ignored).
    ``backbone_pretrained``: start the PVT from its published ImageNet weights (True or a tag).
    ``checkpoint``: a whole model's weights: the authors' / mmsegmentation's Semantic FPN files
    (converted on load, see ``pvt.segmentation.convert``) or this project's own; the backbone
    and class count must be the file's (an error says which). ``model.load_report`` tells what
    was loaded and what was deliberately left out. ``pretrained``: the published ADE20K model for
    ``backbone`` (True or a tag of ``pvt weights``), fetched into the cache where it can be.
    ``allow_nonfinite``: load ``checkpoint`` / ``backbone_checkpoint`` even if it holds NaN or Inf.
    """
    if pretrained:
        if checkpoint is not None:
            raise ValueError("pass either checkpoint= or pretrained=, not both")
        from pvt.hub.published import published_checkpoint

        checkpoint = published_checkpoint(HUB_TASK, backbone, pretrained, "semantic_fpn")
    if isinstance(checkpoint, SegmenterCheckpoint):  # already read (whole-model conversion)
        whole: SegmenterCheckpoint | None = checkpoint
    else:
        whole = read_whole_segmenter(checkpoint) if checkpoint is not None else None
    if whole is not None:
        if whole.backbone not in (None, backbone) or whole.num_classes != num_classes:
            raise CheckpointError(
                f"{whole.source}: a Semantic FPN on {whole.backbone} with {whole.num_classes} classes, not on "
                f"{backbone} with {num_classes}; build semantic_fpn({whole.backbone!r}, "
                f"num_classes={whole.num_classes}, checkpoint=...)"
            )
        if backbone_checkpoint is not None:
            raise ValueError("pass either checkpoint (a whole model) or backbone_checkpoint, not both")
        if not allow_nonfinite:  # before building: the message names the file, not a state dict
            check_finite(whole.state_dict, whole.source)
    bb = backbone_fpn(
        backbone,
        (0, 1, 2, 3),
        fpn_channels=fpn_channels,
        extra=None,
        checkpoint=backbone_checkpoint,
        backbone_pretrained=backbone_pretrained if whole is None else False,  # a whole model replaces it
        drop_path_rate=drop_path_rate,
        freeze_stages=freeze_stages,
        resnet_norm=nn.BatchNorm2d,
        embed_norm_eps=whole.embed_norm_eps if whole is not None else None,
        allow_nonfinite=allow_nonfinite,
    )
    model = SemanticFPN(bb, SemanticFPNHead(fpn_channels, num_classes, head_channels, dropout, norm=norm))
    model.arch = f"semantic_fpn_{backbone}"  # type: ignore[assignment]
    if whole is not None:
        if whole.backbone_layout == FORMAT_NAME:  # this project's own names: an exact load
            what = f"a Semantic FPN on {backbone} with {num_classes} classes"
            load_whole_model(model, whole.state_dict, what, allow_nonfinite=True)  # checked above
        else:
            model.load_report = load_semantic_fpn(model, whole, allow_nonfinite=True)  # type: ignore[assignment]
        model.class_names = whole.class_names  # type: ignore[assignment]
    return model


def converted_segmenter(
    src: str, *, allow_nonfinite: bool = False
) -> tuple[SegmenterCheckpoint, SemanticFPN, dict[str, str]]:
    """A whole Semantic FPN file read once, built and load-checked: (what the file says, the model,
    the safetensors header that rebuilds it: ``task``, ``backbone``, ``num_classes``,
    ``embed_norm_eps`` and the class names (a JSON list, ``classes``) when the source recorded them)."""
    ckpt = read_whole_segmenter(src)
    if ckpt.backbone is None:
        raise CheckpointError(f"{src}: its backbone is not named in the file; nothing to convert it to")
    model = semantic_fpn(ckpt.backbone, ckpt.num_classes, checkpoint=ckpt, allow_nonfinite=allow_nonfinite)
    header = {
        "task": "segmentation",
        "backbone": ckpt.backbone,
        "num_classes": str(ckpt.num_classes),
        "embed_norm_eps": repr(ckpt.embed_norm_eps),
        "source_layout": ckpt.backbone_layout,
    }
    if ckpt.class_names:
        header["classes"] = json.dumps(ckpt.class_names)
    return ckpt, model, header


def convert_segmenter(
    src: str, dst: str, *, allow_nonfinite: bool = False
) -> tuple[SegmenterCheckpoint, LoadReport | None]:
    """Write a whole Semantic FPN file as this project's safetensors, load-checked first (the header:
    see ``converted_segmenter``)."""
    ckpt, model, header = converted_segmenter(src, allow_nonfinite=allow_nonfinite)
    save_safetensors(model.state_dict(), dst, metadata=header)
    return ckpt, getattr(model, "load_report", None)  # None: this project's own file, loaded exactly
