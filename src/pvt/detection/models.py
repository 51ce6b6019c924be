"""RetinaNet and Mask R-CNN on PVT (or torchvision's ResNets), composed from torchvision's detectors.

Wiring follows the papers' mmdetection configs (pvt-facts section 5):

* RetinaNet: C3-C5 into a 256-channel FPN, P6 from **C5** by a 3x3 stride-2 conv and P7 from P6
  (mmdet's ``add_extra_convs='on_input'``). torchvision's ``LastLevelP6P7`` switches to P5 whenever
  C5 already has 256 channels (PVT v2-b0), so ``LastLevelP6P7FromC5`` is used instead.
* Mask R-CNN: C2-C5 into a 256-channel FPN, P6 by max-pool, RoIAlign 7 (boxes) and 14 (masks).

Test-time arithmetic is a named switch, ``semantics``:

* ``"torchvision"`` (the default for a new model, and what every shipped shapes preset was trained
  and measured with): torchvision's rounded anchors, box coder (dw clamped above only), top-k,
  NMS, 0..1 normalisation and float resize, and a ReLU before P7.
* ``"mmdet"``: mmdetection 3.3's (``pvt.detection.mmdet_compat`` / ``mmdet_rcnn``): unrounded
  anchors on fixed strides, ``DeltaXYWHBBoxCoder`` decoding, mmcv's NMS and ``batched_nms``,
  mmdet's per-level post-processing and box rescaling, OpenCV-exact resizing, 0-255 mean/std,
  no ReLU before P7. A model converted from an mmdetection checkpoint is built with it and then
  computes what mmdetection computes; the weights and state-dict keys are the same either way.

Other deliberate differences from mmdetection, each a named argument: ``fpn_channels`` (256),
``anchor_sizes`` (mmdet's octave scales by default), ``min_size`` / ``max_size``, and torchvision's
losses and samplers in training (Mask R-CNN's mask loss leaving out instances whose target says
``mask_valid`` False, see ``pvt.detection.roi_heads``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead

from pvt.dense.fpn import LastLevelP6P7FromC5, backbone_fpn
from pvt.detection.mmdet_compat import MMDetAnchorGenerator, MMDetRetinaNet, MMDetTransform
from pvt.detection.mmdet_rcnn import rpn_anchor_generator, to_mmdet_semantics
from pvt.detection.roi_heads import MaskValidRoIHeads
from pvt.layers.blocks import EMBED_NORM_EPS
from pvt.utils.constants import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from pvt.detection.convert import DetectorCheckpoint
BF16_PARTS = (
    "backbone",  # the PVT and its FPN
    "head",  # RetinaNet's heads
    "rpn.head",
    "roi_heads.box_head",
    "roi_heads.box_predictor",
    "roi_heads.mask_head",
    "roi_heads.mask_predictor",
)
HUB_TASK = "coco"  # the published-weights table's rows of whole detectors


def mmdet_anchor_sizes(
    strides: Sequence[int], octave_base: float = 4, scales: int = 3
) -> tuple[tuple[float, ...], ...]:
    """RetinaNet anchors as in mmdet: ``octave_base * stride * 2^(k / scales)`` per level."""
    return tuple(tuple(octave_base * s * 2 ** (k / scales) for k in range(scales)) for s in strides)


SEMANTICS = ("torchvision", "mmdet")


# torchvision's detectors hand unknown keyword arguments on to their transform, which ignores the
# ones it does not know: a typo such as ``chekpoint=`` would be silently dropped.
_TRANSFORM_KWARGS = frozenset({"size_divisible", "fixed_size"})


def _check_kwargs(builder: Callable[..., Any], detector: type, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments that neither ``builder`` nor torchvision's ``detector`` takes."""
    known = {n for n in inspect.signature(detector).parameters if n not in ("self", "kwargs")}
    known |= _TRANSFORM_KWARGS
    unknown = sorted(set(kwargs) - known)
    if not unknown:
        return
    own = {n for n in inspect.signature(builder).parameters if n != "kwargs"}
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known | own, 1)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise TypeError(f"{builder.__name__}() got unexpected keyword argument(s): {', '.join(hints)}")


def _finish(
    model: Any,
    arch: str,
    mmdet: bool,
    embed_norm_eps: float | None,
    ckpt: DetectorCheckpoint | None,
    allow_nonfinite: bool = False,
) -> Any:
    """Name the built detector, record how it computes, and load the whole-detector file if any."""
    model.arch = arch
    # The parts optimize_for_inference runs in bf16 (anchors, box decoding, NMS, RoI Align stay fp32).
    model.bf16_parts = BF16_PARTS
    model.semantics = "mmdet" if mmdet else "torchvision"
    model.embed_norm_eps = EMBED_NORM_EPS if embed_norm_eps is None else embed_norm_eps
    # Kept in the header of the weights a training run writes, so the file rebuilds the same model.
    model.checkpoint_metadata = {"semantics": model.semantics, "embed_norm_eps": repr(model.embed_norm_eps)}
    if ckpt is not None:
        ckpt.load_into(model, allow_nonfinite=allow_nonfinite)
        model.class_names = ckpt.class_names
    return model


def _whole_detector(
    detector: str,
    backbone: str,
    num_classes: int,
    checkpoint: str | None,
    pretrained: bool | str,
    backbone_weights: bool,
) -> DetectorCheckpoint | None:
    """The whole-detector file a builder loads (``checkpoint=``, or the published one for
    ``pretrained=``), read and checked against the requested detector, backbone and class count."""
    if pretrained:
        if checkpoint is not None:
            raise ValueError("pass either checkpoint= or pretrained=, not both")
        from pvt.hub.published import published_checkpoint

        checkpoint = published_checkpoint(HUB_TASK, backbone, pretrained, detector)
    if checkpoint is None:
        return None
    if backbone_weights:
        raise ValueError("pass either a whole detector (checkpoint= / pretrained=) or backbone weights, not both")
    from pvt.detection.convert import read_detector_checkpoint

    ckpt = read_detector_checkpoint(checkpoint)
    ckpt.check(detector, backbone, num_classes)
    return ckpt


def check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics={semantics!r}: expected one of {SEMANTICS}")
    return semantics


def retinanet(
    backbone: str = "pvt_small",
    num_classes: int = 80,
    *,
    checkpoint: str | None = None,
    pretrained: bool | str = False,
    backbone_checkpoint: str | None = None,
    backbone_pretrained: bool | str = False,
    drop_path_rate: float = 0.1,
    freeze_stages: int = 0,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    head_norm: bool = False,
    semantics: str | None = None,
    embed_norm_eps: float | None = None,
    octave_base_scale: float = 4.0,
    allow_nonfinite: bool = False,
    **kwargs: object,
) -> RetinaNet:
    """RetinaNet (focal loss, 9 anchors per location) on C3-C5 + P6 (from C5) + P7.

    ``num_classes`` counts object classes (80 for COCO); RetinaNet has no background class.
    ``backbone_pretrained``: start the PVT from its published ImageNet weights (True or a tag).
    ``checkpoint``: a whole detector (an mmdetection 2.x / 3.x or authors' mmdet-2.13 file, or
    this project's ``model.safetensors`` / converted file, see ``pvt.detection.convert``);
    its backbone must be ``backbone`` and its class count ``num_classes``. ``semantics``:
    ``"torchvision"`` (default for a new model) or ``"mmdet"`` (mmdetection 3.3's anchors, box
    decoding, preprocessing, post-processing and P7 without ReLU; see
    ``pvt.detection.mmdet_compat``); None takes the checkpoint's. ``embed_norm_eps``: the
    PVT's patch-embedding / spatial-reduction LayerNorm eps (None: the checkpoint's, else 1e-5).
    ``octave_base_scale`` sizes the mmdet anchors (``anchor_sizes`` is torchvision's form).
    ``allow_nonfinite``: load ``checkpoint`` / ``backbone_checkpoint`` even if it holds NaN or Inf.
    Extra ``kwargs`` go to torchvision's ``RetinaNet`` (score thresholds, detections per image...).
    """
    _check_kwargs(retinanet, RetinaNet, kwargs)
    backbone_weights = backbone_checkpoint is not None or bool(backbone_pretrained)
    ckpt = _whole_detector("retinanet", backbone, num_classes, checkpoint, pretrained, backbone_weights)
    if ckpt is not None:
        semantics, embed_norm_eps = ckpt.settings(semantics, embed_norm_eps)
    mmdet = check_semantics(semantics or "torchvision") == "mmdet"
    bb = backbone_fpn(
        backbone,
        (1, 2, 3),
        fpn_channels=fpn_channels,
        extra="p6p7_c5",
        checkpoint=backbone_checkpoint,
        backbone_pretrained=backbone_pretrained,
        drop_path_rate=drop_path_rate,
        freeze_stages=freeze_stages,
        embed_norm_eps=embed_norm_eps,
        allow_nonfinite=allow_nonfinite,
    )
    anchors: AnchorGenerator
    if mmdet:
        if anchor_sizes is not None:
            raise ValueError("semantics='mmdet' sizes anchors by octave_base_scale, not anchor_sizes")
        assert isinstance(bb.fpn.extra_blocks, LastLevelP6P7FromC5)
        bb.fpn.extra_blocks.relu_before_p7 = False  # mmdet relu_before_extra_convs=False
        anchors = MMDetAnchorGenerator(
            (8, 16, 32, 64, 128), aspect_ratios, octave_base_scale=octave_base_scale, scales_per_octave=3
        )
    else:
        strides = (8, 16, 32, 64, 128)
        sizes = (
            tuple(tuple(s) for s in anchor_sizes) if anchor_sizes else mmdet_anchor_sizes(strides, octave_base_scale)
        )
        anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    # GroupNorm in the head (torchvision's RetinaNet v2) trains much faster from scratch; the
    # papers' head has none, so it is off by default.
    norm = partial(nn.GroupNorm, min(32, fpn_channels // 4)) if head_norm else None
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    if mmdet:
        kwargs.setdefault("detections_per_img", 100)  # mmdet max_per_img (torchvision: 300)
    model = (MMDetRetinaNet if mmdet else RetinaNet)(
        bb,
        num_classes,
        min_size=min_size,
        max_size=max_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        anchor_generator=anchors,
        head=head,
        **kwargs,
    )
    if mmdet:
        model.transform = MMDetTransform(min_size, max_size)
    return _finish(model, f"retinanet_{backbone}", mmdet, embed_norm_eps, ckpt, allow_nonfinite)


def mask_rcnn(
    backbone: str = "pvt_small",
    num_classes: int = 80,
    *,
    checkpoint: str | None = None,
    pretrained: bool | str = False,
    backbone_checkpoint: str | None = None,
    backbone_pretrained: bool | str = False,
    drop_path_rate: float = 0.1,
    freeze_stages: int = 0,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[Sequence[float]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    head_width: int | None = None,
    semantics: str | None = None,
    embed_norm_eps: float | None = None,
    allow_nonfinite: bool = False,
    **kwargs: object,
) -> MaskRCNN:
    """Mask R-CNN on C2-C5 + P6 (max-pool), RoIAlign 7 for boxes and 14 for masks.

    ``num_classes`` counts object classes (80 for COCO); the background class is added here.
    ``backbone_pretrained``: start the PVT from its published ImageNet weights (True or a tag).
    ``head_width`` narrows the RoI heads (box MLP and mask convs; the papers' are 1024 / 256).
    ``checkpoint``: a whole detector (mmdetection 2.x / 3.x or authors' Mask R-CNN file, or this
    project's, see ``pvt.detection.convert``); its backbone must be ``backbone`` and its class
    count ``num_classes``. ``semantics``: ``"torchvision"`` (default for a new model) or ``"mmdet"``:
    mmdetection 3.3's unrounded anchors, RPN proposals, RoIAlign (aligned, adaptive sampling) and
    level mapping, RCNN post-process, mask pasting and preprocessing (see
    ``pvt.detection.mmdet_rcnn``); None takes the checkpoint's. The weights are the same either
    way. ``embed_norm_eps``: the PVT's patch-embedding / spatial-reduction LayerNorm eps (None: the
    checkpoint's, else the official 1e-5; mmdetection's PVT uses 1e-6). ``allow_nonfinite``: load
    ``checkpoint`` / ``backbone_checkpoint`` even if it holds NaN or Inf.
    """
    _check_kwargs(mask_rcnn, MaskRCNN, kwargs)
    backbone_weights = backbone_checkpoint is not None or bool(backbone_pretrained)
    ckpt = _whole_detector("mask_rcnn", backbone, num_classes, checkpoint, pretrained, backbone_weights)
    if ckpt is not None:
        semantics, embed_norm_eps = ckpt.settings(semantics, embed_norm_eps)
    mmdet = check_semantics(semantics or "torchvision") == "mmdet"
    bb = backbone_fpn(
        backbone,
        (0, 1, 2, 3),
        fpn_channels=fpn_channels,
        extra="maxpool",
        checkpoint=backbone_checkpoint,
        backbone_pretrained=backbone_pretrained,
        drop_path_rate=drop_path_rate,
        freeze_stages=freeze_stages,
        embed_norm_eps=embed_norm_eps,
        allow_nonfinite=allow_nonfinite,
    )
    sizes = tuple(tuple(s) for s in anchor_sizes) if anchor_sizes else ((32,), (64,), (128,), (256,), (512,))
    anchors = (
        rpn_anchor_generator(sizes, aspect_ratios)
        if mmdet
        else AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    )
    if head_width is not None:
        kwargs.update(
            box_head=TwoMLPHead(fpn_channels * 7 * 7, head_width),
            box_predictor=FastRCNNPredictor(head_width, num_classes + 1),
            mask_head=MaskRCNNHeads(fpn_channels, [head_width] * 4, 1),
            mask_predictor=MaskRCNNPredictor(head_width, head_width, num_classes + 1),
        )
        num_for_model: int | None = None  # the predictors fix the class count
    else:
        num_for_model = num_classes + 1
    model = MaskRCNN(
        bb,
        num_for_model,
        min_size=min_size,
        max_size=max_size,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        rpn_anchor_generator=anchors,
        **kwargs,
    )
    # mask_valid=False instances (no valid polygon) give no mask target; the weights are torchvision's
    model.roi_heads = MaskValidRoIHeads.from_torchvision(model.roi_heads)
    if mmdet:
        to_mmdet_semantics(model)
    return _finish(model, f"mask_rcnn_{backbone}", mmdet, embed_norm_eps, ckpt, allow_nonfinite)
