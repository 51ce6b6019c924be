"""The ``train`` suite: one training step (forward, backward and AdamW) at batch 32, ours against
timm's ``pvt_v2_b2`` on the same weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pvt.bench.harness import Row, Settings, alternate, suite
from pvt.bench.peers import timm_twins


@suite("train", speedups=True, needs="peers")
def train(s: Settings) -> None:
    name, batch, size = ("pvt_v2_b0", 2, 64) if s.quick else ("pvt_v2_b2", 32, 224)
    ours, peer = timm_twins(name)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    steps: dict[str, Callable[[], Any]] = {}
    for label, model in (("pvt-vision", ours), ("timm", peer)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[label] = step
    repeats = max(3, s.repeats // 2)
    times = alternate(steps, repeats)
    for label, t in times.items():
        s.rows.append(Row("train", f"{name} {size}px batch {batch} fwd+bwd+AdamW", label, 1e3 * t, repeats))
