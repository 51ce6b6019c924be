"""AdamW with no-decay groups, lr multipliers, the lr scaling rule, and per-iteration schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pvt.engine.config import OptimConfig, ScheduleConfig


def scaled_lr(cfg: OptimConfig, total_batch: int) -> float:
    """The papers' rule: lr x total batch / base batch (total = per-process x world x accum)."""
    return cfg.lr * total_batch / cfg.base_batch if cfg.scale_lr else cfg.lr


def _no_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def _stage_of(name: str) -> int | None:
    """Backbone stage (1-4) of a parameter name, or None (head / outside the backbone)."""
    for prefix in ("patch_embed", "pos_embed", "block", "norm", "pos_drop"):
        if name.startswith(prefix) and len(name) > len(prefix) and name[len(prefix)].isdigit():
            return int(name[len(prefix)])
    if name.startswith(("cls_token", "norm.")):
        return 4
    return None


def param_groups(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    head_names: Iterable[str] = ("head.",),
    backbone_prefix: str = "",
) -> list[dict[str, object]]:
    """Parameter groups: weight decay off for norms, biases, 1-D tensors and ``no_weight_decay()``;
    ``backbone_lr_mult`` and per-stage ``layer_decay`` multipliers in ``lr_mult``.

    ``backbone_prefix`` names where the PVT sits inside a larger model (e.g. ``"backbone.body."``).
    """
    inner = model
    for part in filter(None, backbone_prefix.rstrip(".").split(".")):
        inner = getattr(inner, part)
    skip = {backbone_prefix + n for n in _no_decay_names(inner)}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        is_head = any(name.startswith(h) for h in head_names)
        mult = 1.0
        if not is_head:
            mult = cfg.backbone_lr_mult
            stage = _stage_of(name[len(backbone_prefix) :]) if name.startswith(backbone_prefix) else None
            if cfg.layer_decay is not None and stage is not None:
                mult *= cfg.layer_decay ** (4 - stage + 1)
        groups.setdefault((no_decay, mult), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else cfg.weight_decay, "lr_mult": mult}
        for (nd, mult), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, **group_kwargs: object) -> torch.optim.AdamW:
    groups = param_groups(model, cfg, **group_kwargs)  # type: ignore[arg-type]
    for g in groups:
        g["lr"] = lr * float(g["lr_mult"])  # type: ignore[arg-type]
    # The fused kernel updates every tensor in one pass (CPU and CUDA): the shapes RetinaNet's 220
    # tensors (4.1 M values) 18 -> 5 ms per step on a 2-core AMD EPYC; same update within 1.5e-8
    # of the per-tensor loop's after 5 steps.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])  # type: ignore[attr-defined]
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)  # type: ignore[arg-type]


class Schedule:
    """Per-iteration learning rate: linear warmup from ``warmup_lr``, then cosine / poly / step.

    Stateless apart from the iteration count, so resuming only needs ``state_dict()``.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, total_iters: int, iters_per_epoch: int) -> None:
        self.cfg = cfg
        self.base_lr = base_lr
        self.total = max(1, total_iters)
        self.per_epoch = max(1, iters_per_epoch)
        if cfg.warmup_iters is not None:
            self.warmup = cfg.warmup_iters
        else:
            self.warmup = round(cfg.warmup_epochs * self.per_epoch)
        self.warmup = min(self.warmup, self.total - 1) if self.total > 1 else 0
        # Step milestones are epochs unless the recipe counts iterations.
        unit = 1 if cfg.iterations is not None else self.per_epoch
        self.milestones = sorted(round(m * unit) for m in cfg.milestones)
        self.iteration = 0

    def lr_at(self, it: int) -> float:
        c = self.cfg
        if it < self.warmup:
            return c.warmup_lr + (self.base_lr - c.warmup_lr) * it / self.warmup
        if c.name == "constant":
            return self.base_lr
        if c.name == "step":
            return self.base_lr * c.gamma ** sum(it >= m for m in self.milestones)
        t = (it - self.warmup) / max(1, self.total - self.warmup)
        t = min(max(t, 0.0), 1.0)
        if c.name == "poly":
            return c.min_lr + (self.base_lr - c.min_lr) * (1 - t) ** c.power
        return c.min_lr + 0.5 * (self.base_lr - c.min_lr) * (1 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set every group's lr for the current iteration; returns the base lr."""
        lr = self.lr_at(self.iteration)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        return lr

    def step(self) -> None:
        self.iteration += 1

    def state_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.iteration = int(state["iteration"])
