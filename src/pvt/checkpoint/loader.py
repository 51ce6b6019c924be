"""Strict checkpoint loading with explicit, reported exceptions.

``load_checkpoint`` reads a file or state dict, detects its layout, renames it to the official
names, adapts what may be adapted (position tables to the model's grid, a head of another class
count), and loads. Anything else that does not fit is an error, never a silent partial load.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pvt.checkpoint.io import FORMAT_NAME, read_checkpoint
from pvt.checkpoint.layouts import (
    CheckpointError,
    StateDict,
    detect_layout,
    split_prefixes,
    to_official,
    unwrap,
)
from pvt.layers.blocks import resize_pos_embed

MIN_BACKBONE_COVERAGE = 0.9
# Keys a dense (features-only) model does not have and a classification checkpoint does.
_CLASSIFIER_ONLY = ("head.", "cls_token", "norm.weight", "norm.bias")
_STAGE_KEY = re.compile(r"^(?:patch_embed|block|norm|pos_embed)(\d)\b")


@dataclass
class LoadReport:
    """What happened to every tensor of a checkpoint load."""

    source: str
    layout: str
    arch: str | None = None  # registered model the checkpoint's backbone matches, if any
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why it was allowed to drop
    kept_init: list[str] = field(default_factory=list)  # model keys left at init (a new head)
    ignored: list[str] = field(default_factory=list)  # non-backbone keys of a detector file
    backbone_total: int = 0

    @property
    def backbone_loaded(self) -> int:
        return sum(1 for k in self.loaded if not k.startswith("head."))

    def __str__(self) -> str:
        lines = [
            f"{self.source}: {self.layout} layout"
            + (f" ({self.arch})" if self.arch else "")
            + f", {self.backbone_loaded}/{self.backbone_total} backbone tensors loaded"
        ]
        for k, (a, b) in self.reshaped.items():
            lines.append(f"  resized {k}: {list(a)} -> {list(b)}")
        for k, why in self.dropped.items():
            lines.append(f"  dropped {k}: {why}")
        if self.kept_init:
            lines.append(f"  kept at init: {', '.join(self.kept_init)}")
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} non-backbone tensors (e.g. {self.ignored[0]})")
        for name in ("missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"  {name}: {len(keys)} (e.g. {', '.join(keys[:3])})")
        for k, (a, b) in self.mismatched.items():
            lines.append(f"  shape mismatch {k}: checkpoint {list(a)} vs model {list(b)}")
        return "\n".join(lines)


def _table_grid(n: int) -> tuple[int, tuple[int, int]]:
    """Token count of a position table -> (number of leading cls slots, square grid)."""
    for extra in (0, 1):
        side = math.isqrt(n - extra)
        if side * side == n - extra:
            return extra, (side, side)
    raise CheckpointError(f"position table of {n} tokens is neither a square grid nor 1 + a square grid")


def resize_pos_table(pos: Tensor, shape: torch.Size) -> Tensor:
    """Resize a ``[1, (1+) h*w, C]`` position table to the model's ``[1, (1+) H*W, C]``."""
    src_extra, src_grid = _table_grid(pos.shape[1])
    dst_extra, dst_grid = _table_grid(shape[1])
    grid = resize_pos_embed(pos[:, src_extra:].float(), src_grid, dst_grid).to(pos.dtype)
    if dst_extra and src_extra:
        return torch.cat([pos[:, :1], grid], dim=1)
    if dst_extra:
        return torch.cat([grid.new_zeros(1, 1, grid.shape[2]), grid], dim=1)
    return grid


# Architecture fingerprints, filled by the model registry as variants register (``register_arch``):
# data flows down, so this layer never imports the models.
_ARCH_BUILDERS: dict[str, Callable[[], nn.Module]] = {}
_ARCH_SIGNATURES: dict[str, frozenset[tuple[str, tuple[int, ...]]]] = {}


def register_arch(name: str, build: Callable[[], nn.Module]) -> None:
    """Let ``infer_arch`` recognise ``name``: ``build()`` makes the model (on the meta device, on use)."""
    _ARCH_BUILDERS[name] = build
    _ARCH_SIGNATURES.pop(name, None)


def _signature(sd: Mapping[str, Tensor]) -> frozenset[tuple[str, tuple[int, ...]]]:
    """Architecture fingerprint: backbone keys and shapes, ignoring resizable and head tensors."""
    skip = ("head.", "pos_embed", "cls_token", "norm.weight", "norm.bias")
    return frozenset((k, tuple(v.shape)) for k, v in sd.items() if not k.startswith(skip))


def _arch_signatures() -> dict[str, frozenset[tuple[str, tuple[int, ...]]]]:
    missing = [n for n in _ARCH_BUILDERS if n not in _ARCH_SIGNATURES]
    if missing:
        with torch.device("meta"):
            for name in missing:
                _ARCH_SIGNATURES[name] = _signature(_ARCH_BUILDERS[name]().state_dict())
    return {n: _ARCH_SIGNATURES[n] for n in _ARCH_BUILDERS}


def infer_arch(sd: Mapping[str, Tensor]) -> str | None:
    """Registered model name whose backbone matches an official-layout state dict exactly."""
    sig = _signature(sd)
    return next((n for n, s in _arch_signatures().items() if s == sig), None)


@dataclass
class Source:
    """A checkpoint read and renamed to the official layout."""

    state_dict: StateDict
    layout: str
    name: str
    ignored: list[str]  # non-backbone keys of a detector / segmenter file


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, object]) -> Source:
    """Any supported source -> its official-layout state dict, layout name and description."""
    meta: dict[str, str] = {}
    if isinstance(source, Mapping):
        sd, name = unwrap(source), "state dict"
    else:
        sd, meta = read_checkpoint(source)
        name = str(source)
    sd, ignored = split_prefixes(sd)
    try:
        layout = detect_layout(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    official = to_official(sd, layout)
    if meta.get("format") == FORMAT_NAME:
        layout = FORMAT_NAME
    return Source(official, layout, name, ignored)


def check_finite(sd: Mapping[str, object], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming a few of the tensors, how many there are, and ``source``.

    Only floating (and complex) tensors are looked at: integer buffers such as BatchNorm's
    ``num_batches_tracked`` cannot hold either. A diverged run's weights would otherwise load
    silently and turn every prediction into NaN (or train on from garbage).
    """
    bad: list[tuple[str, int, int]] = []  # (key, non-finite values, all values)
    for k, v in sd.items():
        if not isinstance(v, Tensor) or v.is_meta or not (v.is_floating_point() or v.is_complex()):
            continue
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            bad.append((k, int(finite.numel() - finite.sum()), v.numel()))
    if not bad:
        return
    shown = ", ".join(f"{k} ({n} of {total})" for k, n, total in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise CheckpointError(
        f"{source}: {len(bad)} tensor(s) hold NaN or Inf values: {shown}{more} (weights of a run that "
        "diverged?); to load them anyway pass allow_nonfinite=True (pvt: --allow-nonfinite)"
    )


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, object],
    *,
    strict: bool = True,
    allow_nonfinite: bool = False,
) -> LoadReport:
    """Load any supported checkpoint into a PVT model and report what happened.

    Allowed without ``strict=False``: dropping a head whose class count differs (the model keeps
    its new head), dropping v1's ``cls_token`` / ``norm`` / ``head`` for a features-only model,
    leaving a head at init when the checkpoint has none, and resizing v1 position tables.
    Raises ``CheckpointError`` for anything else that does not fit, and always when less than
    90% of the backbone's tensors would load, and (unless ``allow_nonfinite``) when a tensor holds
    NaN or Inf (``check_finite``).
    """
    src = read_state_dict(source)
    sd = src.state_dict
    if not allow_nonfinite:
        check_finite(sd, src.name)
    report = LoadReport(src.name, src.layout, arch=infer_arch(sd), ignored=src.ignored)
    target = model.state_dict()

    built = getattr(model, "num_built", None)
    stages = getattr(model, "num_stages", None)
    for k in list(sd):
        m = _STAGE_KEY.match(k)
        if built and stages and m and built < int(m.group(1)) <= stages and k not in target:
            report.dropped[k] = f"stage {m.group(1)} is not built (features_only, out_indices < {built})"
            del sd[k]
    for k in list(sd):
        if k not in target and k.startswith(_CLASSIFIER_ONLY) and not _has_classifier(target, k):
            report.dropped[k] = "classification-only tensor; the model has no classifier"
            del sd[k]
    for k in list(sd):
        if k not in target or sd[k].shape == target[k].shape:
            continue
        old, new = tuple(sd[k].shape), tuple(target[k].shape)
        if k.startswith("pos_embed"):
            sd[k] = resize_pos_table(sd[k], target[k].shape)
            report.reshaped[k] = (old, new)
        elif k.startswith("head."):
            report.dropped[k] = f"head of shape {list(old)} vs the model's {list(new)} (other class count)"
            del sd[k]
        else:
            report.mismatched[k] = (old, new)
            del sd[k]

    report.unexpected = [k for k in sd if k not in target]
    for k in report.unexpected:
        del sd[k]
    absent = [k for k in target if k not in sd]
    report.kept_init = [k for k in absent if k.startswith("head.")]
    report.missing = [k for k in absent if not k.startswith("head.")]
    report.loaded = list(sd)
    report.backbone_total = sum(1 for k in target if not k.startswith("head."))

    coverage = report.backbone_loaded / max(report.backbone_total, 1)
    problems = report.missing or report.unexpected or report.mismatched
    if coverage < MIN_BACKBONE_COVERAGE or (strict and problems):
        raise CheckpointError(_mismatch_message(model, report, coverage, strict))
    model.load_state_dict(sd, strict=False)
    return report


def _has_classifier(target: Mapping[str, Tensor], key: str) -> bool:
    if key.startswith("head."):
        return any(k.startswith("head.") for k in target)
    return key in target


def _mismatch_message(model: nn.Module, report: LoadReport, coverage: float, strict: bool) -> str:
    model_arch = getattr(model, "arch", None) or infer_arch(model.state_dict())
    parts = [f"{report.source}: {report.layout} checkpoint"]
    if report.arch or model_arch:
        parts.append(f"looks like {report.arch or 'an unregistered architecture'}")
        parts.append(f"but the model is {model_arch or type(model).__name__}")
    detail = []
    if report.missing:
        detail.append(f"{len(report.missing)} missing (e.g. {', '.join(report.missing[:3])})")
    if report.unexpected:
        detail.append(f"{len(report.unexpected)} unexpected (e.g. {', '.join(report.unexpected[:3])})")
    for k, (a, b) in list(report.mismatched.items())[:3]:
        detail.append(f"{k} is {list(a)} in the checkpoint but {list(b)} in the model")
    msg = " ".join(parts) + ": " + "; ".join(detail) + f"; {coverage:.0%} of the backbone would load."
    if coverage < MIN_BACKBONE_COVERAGE:
        return msg + " Refusing to load under 90%: build the architecture the checkpoint was trained for."
    return msg + " Build the matching architecture, or pass strict=False to load the matching part."


def misfit(target: Mapping[str, Tensor], sd: Mapping[str, Tensor]) -> str:
    """How ``sd`` fails to fit ``target`` key for key and shape for shape ("" when it fits exactly):
    the counts of missing, unexpected and other-shaped tensors, a few of each named."""
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k} {list(v.shape)} vs {list(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    parts = [f"{len(found)} {what} (e.g. {', '.join(found[:3])})" for what, found in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if found]  # fmt: skip
    return "; ".join(parts)


def load_whole_model(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    what: str,
    *,
    allow_nonfinite: bool = False,
) -> None:
    """Load a whole task model's weights (a run's ``model.safetensors``) exactly, or refuse with a
    message naming the file, ``what`` it should be, and where backbone-only weights go. NaN / Inf
    tensors are refused unless ``allow_nonfinite`` (``check_finite``)."""
    if isinstance(source, Mapping):
        sd, name = dict(source), "state dict"
    else:
        sd, name = read_checkpoint(source)[0], str(source)
    problems = misfit(model.state_dict(), sd)
    if problems:
        raise CheckpointError(f"{name}: not {what} ({problems}); for backbone weights use model.backbone_checkpoint")
    if not allow_nonfinite:
        check_finite(sd, name)
    model.load_state_dict(sd)
