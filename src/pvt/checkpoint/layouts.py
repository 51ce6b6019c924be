"""Checkpoint layouts: detect which code wrote a state dict and rename it to the official names.

Every function here is pure (state dict in, state dict out). The official names are this
project's own names, so ``to_official`` is the whole conversion; shape checks and resizing
happen later, against the model, in ``pvt.checkpoint.loader``.

Layouts:
  ``official``   the authors' classification / detection / segmentation code (also this
                 project's own files, which add metadata but keep the names)
  ``timm``       timm's ``pvt_v2_*`` (``patch_embed``, ``stages.{i}.downsample/blocks/norm``)
  ``hf_pvt``     HF transformers ``PvtModel`` / ``PvtForImageClassification``
  ``hf_pvt_v2``  HF transformers ``PvtV2Model`` / ``PvtV2ForImageClassification`` / ``PvtV2Backbone``
  ``mmdet``      mmdetection's own PVT (``layers.{i}.{0,1,2}``, fused ``in_proj``, 1x1-conv FFN)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

LAYOUTS = ("official", "timm", "hf_pvt", "hf_pvt_v2", "mmdet")

# Wrappers that training scripts put around the weights, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
# Prefixes of whole-model wrappers; the first that covers any key is stripped.
_HF_PREFIXES = ("pvt_v2.", "pvt.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


def unwrap(obj: object, source: str = "state dict") -> StateDict:
    """Find the tensor dict inside a saved object (``{'model': sd}``, ``{'state_dict': sd}``, ...)."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj, seen = inner, seen + 1
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{source}: no state dict found (top-level keys: {keys}); expected a dict of tensors, "
        f"optionally under one of {list(_WRAPPER_KEYS)}"
    )


def strip_module_prefix(sd: StateDict) -> tuple[StateDict, bool]:
    """Strip DDP's ``module.`` when every key has it -> (state dict, whether it was stripped)."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}, True
    return sd, False


def split_prefixes(sd: StateDict) -> tuple[StateDict, list[str]]:
    """Strip DDP's ``module.`` and keep a detector's ``backbone.*`` (its other keys are returned)."""
    sd, _ = strip_module_prefix(sd)
    if any(k.startswith("backbone.") for k in sd):
        ignored = sorted(k for k in sd if not k.startswith("backbone."))
        return {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}, ignored
    return sd, []


def detect_layout(sd: Mapping[str, Tensor]) -> str:
    """Name the layout of a (prefix-stripped) state dict, or raise ``CheckpointError``."""
    keys = list(sd)

    def has(pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.match(k) for k in keys)

    if has(r"^((pvt\.)?encoder\.patch_embeddings\.\d+\.)"):
        return "hf_pvt"
    if has(r"^((pvt_v2\.)?encoder\.layers\.\d+\.patch_embedding\.)"):
        return "hf_pvt_v2"
    if has(r"^patch_embed\.proj\.") or has(r"^stages\.\d+\.blocks\."):
        return "timm"
    if has(r"^layers\.\d+\.0\.projection\."):
        return "mmdet"
    if has(r"^patch_embed\d\.proj\.") or has(r"^block\d\.\d+\."):
        return "official"
    raise CheckpointError(
        f"unknown checkpoint layout (first keys: {keys[:6]}); supported: official PVT, timm "
        "pvt_v2, HF transformers Pvt/PvtV2, mmdetection/mmsegmentation backbones, pvt-vision"
    )


Rule = tuple[str, "str | Callable[[re.Match[str]], str]"]


def _stage(template: str) -> Callable[[re.Match[str]], str]:
    """Replacement that writes a 0-based captured stage index 1-based into ``template``."""
    return lambda m: template.format(int(m.group(1)) + 1)


def _rename(sd: StateDict, rules: list[Rule]) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _fuse_kv(sd: StateDict, key_name: str, value_name: str) -> StateDict:
    """Concatenate separate K and V projections into the official ``kv`` (rows K then V)."""
    out: StateDict = {}
    for k, v in sd.items():
        if f".{value_name}." in k:
            continue
        if f".{key_name}." in k:
            other = sd[k.replace(f".{key_name}.", f".{value_name}.")]
            out[k.replace(f".{key_name}.", ".kv.")] = torch.cat([v, other], dim=0)
        else:
            out[k] = v
    return out


def _timm(sd: StateDict) -> StateDict:
    return _rename(
        sd,
        [
            (r"^patch_embed\.", "patch_embed1."),
            (r"^stages\.(\d+)\.downsample\.", _stage("patch_embed{}.")),
            (r"^stages\.(\d+)\.blocks\.", _stage("block{}.")),
            (r"^stages\.(\d+)\.norm\.", _stage("norm{}.")),
            (r"\.mlp\.dwconv\.(weight|bias)$", r".mlp.dwconv.dwconv.\1"),
        ],
    )


def _strip_hf_prefix(sd: StateDict) -> StateDict:
    for prefix in _HF_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return sd


_HF_BLOCK_RULES: list[Rule] = [
    (r"\.layer_norm_1\.", ".norm1."),
    (r"\.layer_norm_2\.", ".norm2."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"^classifier\.", "head."),
]


def _hf_pvt(sd: StateDict) -> StateDict:
    sd = _rename(
        _strip_hf_prefix(sd),
        [
            (r"^encoder\.patch_embeddings\.3\.cls_token$", "cls_token"),
            (r"^encoder\.patch_embeddings\.(\d)\.position_embeddings$", _stage("pos_embed{}")),
            (r"^encoder\.patch_embeddings\.(\d)\.projection\.", _stage("patch_embed{}.proj.")),
            (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", _stage("patch_embed{}.norm.")),
            (r"^encoder\.block\.(\d)\.", _stage("block{}.")),
            (r"\.attention\.self\.query\.", ".attn.q."),
            (r"\.attention\.self\.key\.", ".attn.key."),
            (r"\.attention\.self\.value\.", ".attn.value."),
            (r"\.attention\.self\.sequence_reduction\.", ".attn.sr."),
            (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
            (r"\.attention\.output\.dense\.", ".attn.proj."),
            (r"^encoder\.layer_norm\.", "norm."),
            *_HF_BLOCK_RULES,
        ],
    )
    return _fuse_kv(sd, "key", "value")


def _hf_pvt_v2(sd: StateDict) -> StateDict:
    sd = _rename(
        _strip_hf_prefix(sd),
        [
            (r"^encoder\.layers\.(\d)\.patch_embedding\.proj\.", _stage("patch_embed{}.proj.")),
            (r"^encoder\.layers\.(\d)\.patch_embedding\.layer_norm\.", _stage("patch_embed{}.norm.")),
            (r"^encoder\.layers\.(\d)\.blocks\.", _stage("block{}.")),
            (r"^encoder\.layers\.(\d)\.layer_norm\.", _stage("norm{}.")),
            (r"\.attention\.query\.", ".attn.q."),
            (r"\.attention\.key\.", ".attn.key."),
            (r"\.attention\.value\.", ".attn.value."),
            (r"\.attention\.proj\.", ".attn.proj."),
            (r"\.attention\.spatial_reduction\.", ".attn.sr."),
            (r"\.attention\.layer_norm\.", ".attn.norm."),
            *_HF_BLOCK_RULES,
        ],
    )
    return _fuse_kv(sd, "key", "value")


def _mmdet(sd: StateDict) -> StateDict:
    """mmdetection's PVT: ``layers.{i}.0`` patch embed, ``layers.{i}.1`` [pos_embed,] blocks,
    ``layers.{i}.2`` stage norm; attention fused as ``in_proj`` = [q; k; v]; FFN as 1x1 convs."""
    conv_ffn = any(".ffn.layers.4." in k for k in sd)
    has_pos = {int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d)\.1\.0\.pos_embed$", k))}
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d)\.(\d)\.(.*)$", k)
        if m is None:
            out[k] = v
            continue
        i, part, rest = int(m.group(1)), m.group(2), m.group(3)
        s = i + 1
        if part == "0":
            out[f"patch_embed{s}.{rest.replace('projection.', 'proj.')}"] = v
        elif part == "2":
            out[f"norm{s}.{rest}"] = v
        elif rest == "0.pos_embed" and i in has_pos:
            side = math.isqrt(v.shape[1])
            if side * side == v.shape[1] and s == 4:
                # mmdet drops the cls slot of the last table; restore an (unused) zero slot.
                v = torch.cat([v.new_zeros(1, 1, v.shape[2]), v], dim=1)
            out[f"pos_embed{s}"] = v
        else:
            j, tail = rest.split(".", 1)
            prefix = f"block{s}.{int(j) - (1 if i in has_pos else 0)}."
            for new_k, new_v in _mmdet_block_tensor(tail, v, conv_ffn):
                out[prefix + new_k] = new_v
    return out


def _mmdet_block_tensor(tail: str, v: Tensor, conv_ffn: bool) -> list[tuple[str, Tensor]]:
    if tail.startswith("attn.attn.in_proj_"):
        kind = tail.rsplit("_", 1)[1]  # weight | bias
        c = v.shape[0] // 3
        return [(f"attn.q.{kind}", v[:c]), (f"attn.kv.{kind}", v[c:])]
    if tail.startswith("attn.attn.out_proj."):
        return [(tail.replace("attn.attn.out_proj.", "attn.proj."), v)]
    m = re.match(r"^ffn\.layers\.(\d)\.(weight|bias)$", tail)
    if m is None:
        return [(tail, v)]
    idx, kind = int(m.group(1)), m.group(2)
    fc2 = 4 if conv_ffn else 3
    if idx == 1 and conv_ffn:
        return [(f"mlp.dwconv.dwconv.{kind}", v)]
    name = {0: "fc1", fc2: "fc2"}.get(idx)
    if name is None:
        return [(tail, v)]
    if kind == "weight" and v.ndim == 4:
        v = v.flatten(1)  # 1x1 conv [out, in, 1, 1] -> linear [out, in]
    return [(f"mlp.{name}.{kind}", v)]


_CONVERTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "official": lambda sd: dict(sd),
    "timm": _timm,
    "hf_pvt": _hf_pvt,
    "hf_pvt_v2": _hf_pvt_v2,
    "mmdet": _mmdet,
}


def to_official(sd: StateDict, layout: str) -> StateDict:
    """Rename a state dict of ``layout`` to the official (= this project's) names."""
    if layout not in _CONVERTERS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return _CONVERTERS[layout](sd)
