"""The ``classify`` suite: 224x224, eval, batch 1, 16 and 32: ours against timm's ``pvt_v2_*`` and
HF transformers' Pvt / PvtV2 on the same weights, torchvision's ResNet-50 as the CNN reference."""

from __future__ import annotations

import torch

from pvt.bench.harness import Settings, compare, suite
from pvt.bench.peers import hf_twins, timm_twins


@suite("classify", speedups=True, needs="peers")
def classify(s: Settings) -> None:
    """Batch 1: every variant (v2 against timm and HF, v1 against HF); batch 16: v2-b2 and
    PVT-Small; batch 32: v2-b2; ResNet-50 beside v2-b2 (about the same GMACs)."""
    import torchvision

    from pvt.models import list_models

    v2 = ["pvt_v2_b0"] if s.quick else list_models("pvt_v2_*")
    v1 = ["pvt_tiny"] if s.quick else ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"]
    size = 64 if s.quick else 224
    plan = [(1, v2, v1)] if s.quick else [(1, v2, v1), (16, ["pvt_v2_b2"], ["pvt_small"]), (32, ["pvt_v2_b2"], [])]
    for batch, v2_names, v1_names in plan:
        x = torch.randn(batch, 3, size, size)
        for name in v2_names:
            ours, timm_model = timm_twins(name)
            ours_hf, hf_model = hf_twins(name)
            models = {"pvt-vision": ours, "timm": timm_model, "HF transformers": hf_model}
            if name == "pvt_v2_b2":
                models["torchvision resnet50"] = torchvision.models.resnet50().eval()
            compare(s, "classify", f"{name} {size}px batch {batch}", models, x, {"HF transformers": ours_hf})
        # HF's v1 resizes its position tables only to 224 (its shortcut), so v1 runs at 224.
        x = torch.randn(batch, 3, 224, 224)
        for name in v1_names:
            ours, hf_model = hf_twins(name)
            compare(s, "classify", f"{name} 224px batch {batch}", {"pvt-vision": ours, "HF transformers": hf_model}, x)
