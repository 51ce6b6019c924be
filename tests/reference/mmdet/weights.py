"""Seeded mmdetection-layout state dicts, rebuilt with torch alone (no mmdetection, no checkpoint files).

``make_state_dict(model, seed)`` returns the exact tensors that ``make_reference.py`` wrote into the
mmengine checkpoint that mmdetection 3.3 ran to produce ``<model>.pt``; a test rebuilds them, converts
them with our converter and compares our detector's outputs with mmdetection's.

How the tensors are drawn (deterministic: one ``torch.Generator`` seeded once, the keys of
``keys/<model>.txt`` in file order, one ``torch.randn(shape)`` per key, values clamped to [-2, 2]
("trunc-normal-ish"), then an affine map chosen by the key's kind):

| kind (first rule that matches)                         | value                                   |
|--------------------------------------------------------|-----------------------------------------|
| last layer of a head branch (``LAST_LAYERS``)          | ``w_std * z``; bias ``mean + b_std * z`` (1) |
| hidden ReLU layer of a head (``RELU_LAYERS``)          | He: ``sqrt(2 / fan_in) * z``; bias ``0.02 * z`` |
| ``pos_embed`` (PVT v1)                                 | ``0.02 * z``                            |
| 1-D ``.weight`` (every LayerNorm)                      | ``1 + 0.05 * z``                        |
| any ``.bias`` / ``_bias``                              | ``0.02 * z``                            |
| any other weight (linear, conv, depthwise, sr, embed)  | ``z / sqrt(fan_in)``                    |

(1) for ``fc_cls`` the background column (80, last in mmdet) gets mean +2, the classes mean 0.

``fan_in`` is ``shape[1:].numel()``, except for the ConvTranspose2d ``mask_head.upsample`` (weight
``[in, out, 2, 2]``, stride 2: each output pixel sees exactly one tap per input channel, so its fan-in
is ``shape[0]``).  The last-layer weight stds are fixed numbers, measured once with
``make_reference.py --calibrate`` so that the weight part of each layer's output has the harness's target
std on the first test image (``make_reference.TARGET_STD``: the harness's ``mmdet_ref.CALIB`` targets,
retina_reg 0.5, rpn_cls 1.5, rpn_reg 0.3, fc_cls 1.5, fc_reg 1.0, conv_logits 2.0, and the bias rules
are the harness's, except: retina_cls std 4.0 / bias mean -16 (v2-b0) and 3.0 / -12 (PVT-S) instead of
1.0 / -4, so that the 100 detections' scores spread over ~0.1-0.9 instead of bunching at ~0.5-0.7;
fc_cls std 1.875 (not 1.5) and conv_logits std 6.0 / bias mean -1 (not 2.0 / 0), so that Mask R-CNN's
scores spread wider and its masks fill ~70-85% of their box instead of ~90%).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODELS = ("retinanet_pvtv2_b0", "retinanet_pvt_s", "mask_rcnn_pvtv2_b0", "mask_rcnn_pvt_s")

# (weight std, bias mean, bias std) per last layer; "bg+2" adds +2 to the background bias (column 80).
# Weight stds: target_std / (sqrt(fan_in) * rms of the layer's input) on images()[0], see --calibrate.
LAST_LAYERS: dict[str, dict[str, tuple[float, float | str, float]]] = {
    "retinanet_pvtv2_b0": {
        "bbox_head.retina_cls": (0.0708, -16.0, 0.4),
        "bbox_head.retina_reg": (0.00921, 0.0, 0.1),
    },
    "retinanet_pvt_s": {
        "bbox_head.retina_cls": (0.025, -12.0, 0.4),
        "bbox_head.retina_reg": (0.00433, 0.0, 0.1),
    },
    "mask_rcnn_pvtv2_b0": {
        "rpn_head.rpn_cls": (0.0503, 0.0, 0.5),
        "rpn_head.rpn_reg": (0.0101, 0.0, 0.05),
        "roi_head.bbox_head.fc_cls": (0.0353, "bg+2", 0.5),
        "roi_head.bbox_head.fc_reg": (0.0188, 0.0, 0.1),
        "roi_head.mask_head.conv_logits": (0.382, -1.0, 0.5),
    },
    "mask_rcnn_pvt_s": {
        "rpn_head.rpn_cls": (0.0274, 0.0, 0.5),
        "rpn_head.rpn_reg": (0.00547, 0.0, 0.05),
        "roi_head.bbox_head.fc_cls": (0.0167, "bg+2", 0.5),
        "roi_head.bbox_head.fc_reg": (0.00893, 0.0, 0.1),
        "roi_head.mask_head.conv_logits": (0.145, -1.0, 0.5),
    },
}
# Hidden head layers followed by a ReLU (He init keeps their activations from fading).
RELU_LAYERS = re.compile(
    r"^(bbox_head\.(cls|reg)_convs\.\d+\.conv|rpn_head\.rpn_conv|roi_head\.bbox_head\.shared_fcs\.\d+"
    r"|roi_head\.mask_head\.convs\.\d+\.conv|roi_head\.mask_head\.upsample)\.(weight|bias)$"
)
CLAMP = 2.0


def read_keys(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """The mmdet state-dict keys of ``model`` with their shapes, in ``keys/<model>.txt`` order.

    Each line is ``name [d0, d1, ...]`` (copied from ../shared/tools/mmdet-reference/keys/)."""
    path = HERE / "keys" / f"{model}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no key list for {model!r}; known models: {', '.join(MODELS)}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.fullmatch(r"(\S+) \[([0-9, ]*)\]", line.strip())
        if not m:
            raise ValueError(f"{path}:{n}: expected 'name [d0, d1, ...]', got {line!r}")
        out.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d.strip())))
    return out


def _fan_in(key: str, shape: tuple[int, ...]) -> int:
    if key.startswith("roi_head.mask_head.upsample."):
        return shape[0]  # ConvTranspose2d weight [in, out, kh, kw] with kernel == stride
    return math.prod(shape[1:])


def _value(model: str, key: str, shape: tuple[int, ...], z: torch.Tensor) -> torch.Tensor:
    """Map the clamped standard normal draw ``z`` (same shape as the tensor) to the key's value."""
    module, _, param = key.rpartition(".")
    last = LAST_LAYERS[model].get(module)
    if last is not None:
        w_std, b_mean, b_std = last
        if param == "weight":
            return z * w_std
        b = z * b_std
        if b_mean == "bg+2":
            b[-1] += 2.0  # mmdet's fc_cls puts background last (column num_classes)
        else:
            b += float(b_mean)
        return b
    if RELU_LAYERS.match(key):
        return z * 0.02 if param == "bias" else z * math.sqrt(2.0 / _fan_in(key, shape))
    if param == "pos_embed":
        return z * 0.02
    if param.endswith("bias"):
        return z * 0.02
    if len(shape) == 1:
        if "norm" not in key and not re.search(r"backbone\.layers\.\d+\.2\.weight$", key):
            raise ValueError(f"{key}: 1-D weight that is not a LayerNorm; add a rule in weights.py")
        return 1.0 + z * 0.05
    return z / math.sqrt(_fan_in(key, shape))


def make_state_dict(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 state dict in mmdetection 3.3's layout for ``model`` (one of ``MODELS``).

    The same (model, seed) gives bit-identical tensors on any run (torch's CPU generator)."""
    if model not in LAST_LAYERS:
        raise KeyError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in read_keys(model):
        z = torch.randn(shape, generator=gen, dtype=torch.float32).clamp_(-CLAMP, CLAMP)
        out[key] = _value(model, key, shape, z).contiguous()
    missing = set(LAST_LAYERS[model]) - {k.rpartition(".")[0] for k in out}
    if missing:
        raise KeyError(f"LAST_LAYERS[{model!r}] names layers absent from keys/{model}.txt: {sorted(missing)}")
    return out


def state_dict_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over the keys, shapes, dtypes and raw bytes, in order: detects any drift of torch's RNG."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
