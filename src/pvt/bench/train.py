"""The ``train`` suite: one training step (forward, backward and AdamW), ours against timm's on the
same weights and batch: pvt_v2_b0 at batch 16 and pvt_v2_b2 at batch 32 (224 px), and the shapes
RetinaNet of the embedded preset (pvt_v2_b0, 256 px, batch 4; timm has no detector: ours alone).

Each in fp32 and, where the CPU computes bf16 (AVX512-BF16 or AMX), under bf16 autocast as
``train.amp=bf16`` runs it, with timm's fp32 step in the same rounds for the speed-up over it. Each
side's optimizer is the one its own training builds: ours ``pvt train``'s (``engine.optim``: fused
AdamW), timm's ``torch.optim.AdamW`` as timm's ``create_optimizer_v2`` makes it. A row's GFLOP/s
counts a training step as three forwards (the papers' MACs convention: the forward, and the two
products of the backward) against the GEMM peak of its own arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pvt.bench.harness import Row, Settings, alternate, model_gmacs, suite
from pvt.bench.peers import timm_twins
from pvt.engine.config import OptimConfig
from pvt.engine.optim import build_optimizer
from pvt.utils.hardware import cpu_info

Step = Callable[[], Any]


def _autocast(amp: str) -> Callable[[], Any]:
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext


def ours_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The AdamW ``pvt train`` builds (parameter groups, fused kernel)."""
    return build_optimizer(model, OptimConfig(), lr=1e-4)


def classifier_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str, *, ours: bool) -> Step:
    """``model``'s step: zero the gradients, loss, backward, AdamW (fp32 weights and state)."""
    model.train()
    opt = ours_adamw(model) if ours else torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = _autocast(amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


@suite("train", speedups=True, needs="peers")
def train(s: Settings) -> None:
    plans = [("pvt_v2_b0", 2, 64)] if s.quick else [("pvt_v2_b0", 16, 224), ("pvt_v2_b2", 32, 224)]
    amps = ["fp32", *(["bf16"] if cpu_info().bf16 else [])]
    repeats = max(3, s.repeats // 2)
    for name, batch, size in plans:
        ours, peer = timm_twins(name)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
        forward = model_gmacs(ours, (3, size, size))
        gmacs = None if forward is None else 3 * forward * batch
        setting = f"{name} {size}px batch {batch} fwd+bwd+AdamW"
        steps = {"timm": classifier_step(peer, x, y, "fp32", ours=False)}
        for amp in amps:
            steps[f"pvt-vision {amp}"] = classifier_step(ours, x, y, amp, ours=True)
            if amp != "fp32":
                steps[f"timm {amp}"] = classifier_step(peer, x, y, amp, ours=False)
        times = alternate(steps, repeats)
        for label, t in times.items():
            precision = "bf16" if label.endswith("bf16") else "fp32"
            # "pvt-vision fp32" is the row the speed-ups are taken against (the harness's "pvt-vision").
            shown = "pvt-vision" if label == "pvt-vision fp32" else label
            s.rows.append(Row("train", setting, shown, 1e3 * t, repeats, gmacs=gmacs, precision=precision,
                              note=_over_timm(times, label)))  # fmt: skip
    retinanet_rows(s, amps, repeats)


def _over_timm(times: dict[str, float], label: str) -> str | None:
    if label == "timm":
        return None
    return f"{times['timm'] / times[label]:.2f}x timm's fp32 step"


def retinanet_rows(s: Settings, amps: list[str], repeats: int) -> None:
    """The shapes preset's RetinaNet (built by the detection task from the preset), batch 4."""
    from pvt.engine import load_recipe
    from pvt.engine.presets import load_preset
    from pvt.tasks import get_task

    task = get_task("detection")
    size, batch = (64, 2) if s.quick else (256, 4)
    sets = [f"model.min_size=[{size}]", f"model.max_size={size}"]
    recipe = load_recipe("detection", task.data_config, load_preset("detection", "shapes-retinanet"), sets,
                         model_cls=task.model_config)  # fmt: skip
    model = task.build_model(recipe).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=g) * (size * 0.6)
        wh = 12 + torch.rand(6, 2, generator=g) * (size * 0.3)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 4, (6,), generator=g)})
    steps: dict[str, Step] = {}
    for amp in amps:
        opt = ours_adamw(model)
        autocast = _autocast(amp)

        def step(opt: torch.optim.Optimizer = opt, autocast: Callable[[], Any] = autocast) -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                losses = model(images, targets)
            sum(losses.values()).backward()
            opt.step()

        steps[f"pvt-vision {amp}"] = step
    times = alternate(steps, repeats)
    for label, t in times.items():
        shown = "pvt-vision" if label == "pvt-vision fp32" else label
        s.rows.append(Row("train", f"shapes RetinaNet (pvt_v2_b0) {size}px batch {batch} fwd+bwd+AdamW", shown,
                          1e3 * t, repeats, precision="bf16" if label.endswith("bf16") else "fp32",
                          note="no peer: timm has no detector"))  # fmt: skip
