"""The FPN wiring the dense tasks share: a PVT (or torchvision ResNet) body with torchvision's
``FeaturePyramidNetwork`` on top, and RetinaNet's P6/P7 extra block."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from pvt.models import create_model, list_models

RESNETS = ("resnet18", "resnet50", "resnet101")


class LastLevelP6P7FromC5(ExtraFPNBlock):
    """P6 = conv3x3/2(C5), P7 = conv3x3/2(relu(P6)), whatever C5's width (mmdet ``on_input``).

    ``relu_before_p7=False`` is mmdet's RetinaNet FPN (``relu_before_extra_convs=False``,
    fpn.py:220): P7 = conv3x3/2(P6). torchvision's ``LastLevelP6P7`` (and so this block's default,
    kept for the models trained here) applies the ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, *, relu_before_p7: bool = True) -> None:
        super().__init__()
        self.relu_before_p7 = relu_before_p7
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for m in (self.p6, self.p7):
            nn.init.kaiming_uniform_(m.weight, a=1)
            assert m.bias is not None
            nn.init.zeros_(m.bias)

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return [*p, p6, p7], [*names, "p6", "p7"]


class BackboneFPN(nn.Module):
    """A multi-scale body (dict of NCHW maps) and an FPN: the ``backbone`` torchvision detectors take.

    ``[B, 3, H, W]`` -> ``OrderedDict`` of ``[B, out_channels, H/s, W/s]`` maps.
    """

    def __init__(
        self, body: nn.Module, in_channels: Sequence[int], out_channels: int, extra: ExtraFPNBlock | None
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


class _ResNetBody(nn.Module):
    """torchvision ResNet stages ``layer1..4`` returning the chosen ones as a list (frozen BN for
    detection, as torchvision's and mmdet's detectors; trainable BN for segmentation, as mmseg)."""

    def __init__(self, name: str, stages: Sequence[int], norm_layer: type[nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        net = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.stages = tuple(stages)
        widths = [64, 128, 256, 512] if name == "resnet18" else [256, 512, 1024, 2048]
        self.channels = [widths[i] for i in self.stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.stages:
                out.append(x)
            if i >= max(self.stages):
                break
        return out


def backbone_fpn(
    backbone: str,
    stages: Sequence[int],
    *,
    fpn_channels: int,
    extra: str | None,
    checkpoint: str | None = None,
    backbone_pretrained: bool | str = False,
    drop_path_rate: float = 0.1,
    freeze_stages: int = 0,
    resnet_norm: type[nn.Module] = FrozenBatchNorm2d,
    embed_norm_eps: float | None = None,
    allow_nonfinite: bool = False,
) -> BackboneFPN:
    """PVT (``features_only``) or ResNet body for the given stages (0 = stride 4) with an FPN.

    ``extra``: ``"p6p7_c5"`` (RetinaNet), ``"maxpool"`` (Mask R-CNN) or None (Semantic FPN).
    ``backbone_pretrained``: the PVT's published ImageNet weights (True: the default source, or a
    tag, see ``pvt weights``), the papers' starting point; ``checkpoint``: a backbone file instead.
    ``embed_norm_eps``: the PVT's patch-embedding / spatial-reduction LayerNorm eps (None: the
    official 1e-5; mmdetection's own PVT, and so its checkpoints, use 1e-6).
    """
    body: nn.Module
    if checkpoint is not None and backbone_pretrained:
        raise ValueError("pass either backbone_checkpoint (a file) or backbone_pretrained (published weights)")
    if backbone in RESNETS:
        if checkpoint is not None or backbone_pretrained:
            raise ValueError(
                "backbone_checkpoint / backbone_pretrained work for PVT backbones; load ResNet weights yourself"
            )
        rn = _ResNetBody(backbone, stages, resnet_norm)
        body, channels = rn, rn.channels
    elif backbone in list_models():
        eps: dict[str, Any] = {} if embed_norm_eps is None else {"embed_norm_eps": embed_norm_eps}
        pvt = create_model(
            backbone,
            features_only=True,
            out_indices=tuple(stages),
            drop_path_rate=drop_path_rate,
            pretrained=backbone_pretrained,
            checkpoint=checkpoint,
            allow_nonfinite=allow_nonfinite,
            **eps,
        )
        if freeze_stages:
            pvt.freeze_stages(freeze_stages)
        body, channels = pvt, pvt.feature_info.channels()
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose a PVT ({', '.join(list_models())}) or {RESNETS}")
    block: ExtraFPNBlock | None
    if extra == "p6p7_c5":
        block = LastLevelP6P7FromC5(channels[-1], fpn_channels)
    elif extra == "maxpool":
        block = LastLevelMaxPool()
    elif extra is None:
        block = None
    else:
        raise ValueError(f"extra={extra!r}: expected 'p6p7_c5', 'maxpool' or None")
    return BackboneFPN(body, channels, fpn_channels, block)
