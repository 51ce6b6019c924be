"""Model registry: every published variant, its builder and its published numbers as data."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pvt.checkpoint.loader import register_arch


@dataclass(frozen=True)
class ModelCard:
    """A variant's published facts (pvt-facts sections 2-5), checked against the built model."""

    name: str
    family: str  # "v1" or "v2"
    params_m: float  # exact count with the 1000-class head, millions, 3 decimals
    paper_params_m: float  # as printed in the papers / official README
    paper_gmacs: float  # ImageNet "GFLOPs" at 224, which are GMACs (see pvt.complexity)
    top1: float  # ImageNet-1K top-1 (%), 224 center crop
    drop_path_rate: float  # ImageNet recipe
    clip_grad: float | None  # ImageNet recipe


@dataclass(frozen=True)
class _Entry:
    card: ModelCard
    build: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register_model(card: ModelCard, build: Callable[..., nn.Module]) -> None:
    if card.name in _REGISTRY:
        raise ValueError(f"model {card.name!r} is already registered")
    _REGISTRY[card.name] = _Entry(card, build)
    register_arch(card.name, build)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (``"pvt_v2_*"``), in zoo order."""
    return [n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)]


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name}*") or list(_REGISTRY)
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(close)}")
    return _REGISTRY[name]


def model_card(name: str) -> ModelCard:
    """The published facts of a registered model."""
    return _entry(name).card


def model_builder(name: str) -> Callable[..., nn.Module]:
    return _entry(name).build
