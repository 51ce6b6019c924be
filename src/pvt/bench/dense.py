"""The ``dense`` suite: multi-scale features at 512x512 and 800x1333 (ours against timm's and HF
transformers' backbones, same weights), and RetinaNet-PVT-Small against torchvision's
RetinaNet-ResNet-50 end to end at 800x1333."""

from __future__ import annotations

import torch

from pvt.bench.harness import Row, Settings, alternate, compare, infer, suite
from pvt.bench.peers import hf_twins, timm_twins


@suite("dense", speedups=True, needs="peers")
def dense(s: Settings) -> None:
    import torchvision

    from pvt.detection import retinanet

    name = "pvt_v2_b0" if s.quick else "pvt_v2_b2"
    sizes = [(64, 64)] if s.quick else [(512, 512), (800, 1333)]
    ours, timm_model = timm_twins(name, features_only=True)
    ours_hf, hf_model = hf_twins(name, backbone=True)
    models = {"pvt-vision": ours, "timm": timm_model, "HF transformers": hf_model}
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        compare(s, "dense", f"{name} features {h}x{w}", models, x, {"HF transformers": ours_hf})
    # End to end, torchvision's own resize included: the papers' PVT-vs-ResNet detector pair.
    h, w = (128, 128) if s.quick else (800, 1333)
    backbone = "pvt_tiny" if s.quick else "pvt_small"
    detectors = {
        "pvt-vision": retinanet(backbone).eval(),
        "torchvision resnet50": torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None
        ).eval(),
    }
    images = [torch.rand(3, h, w)]
    repeats = max(3, s.repeats // 2)
    times = alternate({n: infer(m, images) for n, m in detectors.items()}, repeats)
    for n, t in times.items():
        s.rows.append(Row("dense", f"RetinaNet {backbone} vs resnet50, {h}x{w} image", n, 1e3 * t, repeats))
