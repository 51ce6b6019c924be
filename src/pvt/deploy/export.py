"""Export a model to ONNX or to a ``torch.export`` program (``.pt2``), with what a consumer needs
to feed it carried in the file.

Which exporter: classifiers, features-only backbones and Semantic FPNs go through
``torch.onnx.export(..., dynamo=True)`` (built on ``torch.export``), so batch, height and width can
be symbolic. RetinaNet and Mask R-CNN go through the TorchScript exporter (``dynamo=False``, the
path torchvision's own ONNX tests cover): their post-processing keeps a data-dependent number of
boxes at every step (score threshold, ``topk(min(k, n))``, NMS), on which ``torch.export`` cannot
guard, so neither the dynamo ONNX path nor ``pt2`` can trace them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt.io import atomic_write

FORMATS = ("onnx", "pt2")
KINDS = ("classification", "features", "detection", "segmentation")
METADATA_FILE = "pvt_metadata.json"  # inside a .pt2 archive (torch.export.save's extra_files)
METADATA_PREFIX = "pvt."  # ONNX metadata_props keys
TORCHSCRIPT_OPSET = 17
MAX_SIDE = 16384  # upper bound of a dynamic height / width


class ExportError(ValueError):
    """A model, input or file that cannot be exported or read back; the message says why and what to do."""


def model_kind(model: nn.Module) -> str:
    """classification | features | detection | segmentation, or an ExportError naming what is accepted."""
    from torchvision.models.detection import MaskRCNN, RetinaNet

    from pvt.models import PyramidBackbone
    from pvt.tasks.segmentation.models import SemanticFPN

    if isinstance(model, (RetinaNet, MaskRCNN)):
        return "detection"
    if isinstance(model, SemanticFPN):
        return "segmentation"
    if isinstance(model, PyramidBackbone):
        return "features" if model.features_only else "classification"
    raise ExportError(
        f"cannot export a {type(model).__name__}: pvt.export takes a PVT classifier or features-only backbone "
        "(pvt.create_model), a RetinaNet / Mask R-CNN (pvt.detection) or a Semantic FPN (pvt.segmentation)"
    )


def min_dynamic_side(model: nn.Module) -> int:
    """Smallest height / width a dynamic export accepts.

    Exporters treat a dimension of size 1 as broadcastable and fix it, so a symbolic side must keep
    every stage's token grid and every spatial reduction's key / value grid at 2 or more (PVT v2:
    61 px, from stage 1's 8x reduction; b2-li's pooled 7x7 keys need no more than its grids).
    """
    from pvt.models import PyramidBackbone
    from pvt.models.layers import Attention

    pvt = next((m for m in model.modules() if isinstance(m, PyramidBackbone)), None)
    if pvt is None:  # a ResNet body: stride 32 keeps the last map at 2
        return 64
    for side in range(1, 1025):
        ok = True
        for i, (h, w) in enumerate(pvt.stage_grid(side, side)):
            attn = pvt._stage_blocks(i)[0].attn
            assert isinstance(attn, Attention)
            if min(h, w, *attn.kv_grid(h, w)) < 2:
                ok = False
                break
        if ok:
            return side
    raise ExportError(f"{type(pvt).__name__}: no input side up to 1024 keeps every grid at 2 or more")


def output_names(model: nn.Module, kind: str) -> list[str]:
    if kind == "features":
        return [f"features_s{r}" for r in model.feature_info.reduction()]  # type: ignore[union-attr, operator]
    if kind == "detection":
        from torchvision.models.detection import MaskRCNN

        return ["boxes", "scores", "labels"] + (["masks"] if isinstance(model, MaskRCNN) else [])
    return ["logits"]


class _DetectorOnImage(nn.Module):
    """A torchvision detector as a function of one ``[3, H, W]`` image returning a tuple of tensors
    (exporters take tensors, not the list of images and list of dicts torchvision uses)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.detector([image])[0]
        return tuple(out[k] for k in ("boxes", "scores", "labels", "masks") if k in out)


def _example(model: nn.Module, kind: str, example: Tensor, dynamic: bool) -> Tensor:
    """Check the example's shape; a dynamic dense export traces batch 2 (a traced batch of 1 is
    fixed to 1 by the exporter, see ``min_dynamic_side``)."""
    if kind == "detection":
        if example.ndim == 4 and example.shape[0] == 1:
            example = example[0]
        if example.ndim != 3 or example.shape[0] != 3:
            raise ExportError(
                f"a detector exports for one RGB image [3, H, W] in 0..1, got shape {tuple(example.shape)}; "
                "batches are not supported: torchvision's detectors loop over a list of images in Python, so a "
                "traced file would hold a fixed number of images; run the file once per image"
            )
        h, w = example.shape[-2:]
        if dynamic and h != w:
            # Mask R-CNN's MultiScaleRoIAlign infers each level's scale from the image and map sizes
            # (feature / image side, rounded to a power of 2), which a trace freezes; a square
            # example gives the exact 1/4 ... 1/32 that every ordinary image gets in eager mode.
            example = F.interpolate(example[None], size=(max(h, w), max(h, w)), mode="bilinear")[0]
        return example
    if example.ndim != 4 or example.shape[1] != 3:
        raise ExportError(f"expected an example image batch [B, 3, H, W], got shape {tuple(example.shape)}")
    if dynamic:
        low = min_dynamic_side(model)
        if min(example.shape[-2:]) < low:
            raise ExportError(
                f"example {example.shape[-2]}x{example.shape[-1]} is below the {low} px a dynamic export of "
                f"{getattr(model, 'arch', type(model).__name__)} needs: at smaller sizes a token or key/value grid "
                "has size 1, which the exporter fixes instead of keeping symbolic; use --size with both sides "
                f">= {low}"
            )
        if example.shape[0] == 1:
            example = example.expand(2, -1, -1, -1).contiguous()
    return example


def _dynamic_shapes(model: nn.Module, dynamic: bool) -> tuple[dict[int, Any], ...] | None:
    if not dynamic:
        return None
    from torch.export import Dim

    low = min_dynamic_side(model)
    batch = Dim("batch", min=1, max=4096)
    return ({0: batch, 2: Dim("height", min=low, max=MAX_SIDE), 3: Dim("width", min=low, max=MAX_SIDE)},)


def _fail(what: str, out: Path, e: Exception) -> ExportError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ExportError(f"{out}: {what} failed: {type(e).__name__}: {first[:500]}")


def _write_onnx(model: nn.Module, kind: str, x: Tensor, dynamic: bool, names: list[str], tmp: str) -> str:
    """Write the ONNX graph to ``tmp``; returns the exporter used."""
    if kind == "detection":
        axes: dict[str, dict[int, str]] = {n: {0: "detections"} for n in names}
        if dynamic:
            axes["image"] = {1: "height", 2: "width"}
            if "masks" in names:
                axes["masks"] = {0: "detections", 2: "height", 3: "width"}
        torch.onnx.export(
            _DetectorOnImage(model).eval(),
            (x,),
            tmp,
            dynamo=False,
            opset_version=TORCHSCRIPT_OPSET,
            input_names=["image"],
            output_names=names,
            dynamic_axes=axes,
        )
        return f"torch.onnx.export (TorchScript, opset {TORCHSCRIPT_OPSET})"
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        dynamic_shapes=_dynamic_shapes(model, dynamic),
        input_names=["image"],
        output_names=names,
        verbose=False,
    )
    assert program is not None
    program.save(tmp)
    return f"torch.onnx.export (dynamo, opset {program.model.opset_imports.get('', '?')})"


def _add_onnx_metadata(path: str, metadata: Mapping[str, Any]) -> None:
    import onnx

    proto = onnx.load(path)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)
    onnx.save(proto, path)


def export(
    model: nn.Module,
    example: Tensor,
    out: str | Path,
    *,
    format: str = "onnx",
    dynamic: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` (in eval mode, fp32, CPU) traced on ``example`` to ``out``, written atomically.

    ``example``: ``[B, 3, H, W]`` for a classifier, backbone or Semantic FPN (a classifier or
    backbone takes normalised input, a Semantic FPN RGB in 0..1), one ``[3, H, W]`` RGB image in
    0..1 for a detector (which resizes and normalises inside). ``format``: ``"onnx"`` or ``"pt2"``
    (``torch.export.save``; detectors cannot be traced by ``torch.export``, see the module doc).
    ``dynamic``: batch, height and width symbolic (a detector: height and width; it takes one image
    per run), sides from ``min_dynamic_side(model)`` up. ``metadata``: what a consumer needs
    (``pvt.deploy.metadata.describe`` builds it; by default from the model alone), stored as
    ``pvt.*`` metadata_props (ONNX) or ``pvt_metadata.json`` (pt2).
    """
    from pvt.deploy.metadata import describe

    out = Path(out)
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: expected one of {FORMATS}")
    kind = model_kind(model)
    if format == "pt2" and kind == "detection":
        raise ExportError(
            f"{out}: a detector cannot be exported to pt2: torch.export cannot trace torchvision's RetinaNet / "
            "Mask R-CNN post-processing, whose number of boxes after the score threshold, top-k and NMS depends on "
            "the data and on which torchvision's code branches (a data-dependent guard); export it with "
            "--format onnx (TorchScript exporter) instead"
        )
    if kind == "detection" and getattr(model, "semantics", "torchvision") == "mmdet":
        raise ExportError(
            f"{out}: a detector with semantics='mmdet' cannot be exported faithfully: its preprocessing decides per "
            "image whether the pixels hold 8-bit values and then resizes with OpenCV's fixed-point arithmetic "
            "(pvt.tasks.detection.mmdet_compat), a data-dependent choice a traced graph would freeze to the "
            "example's; build it with semantics='torchvision' (--set model.semantics=torchvision) to export it"
        )
    model = model.eval()
    example = example.detach().to("cpu", torch.float32)
    x = _example(model, kind, example, dynamic)
    names = output_names(model, kind)
    info: dict[str, Any] = dict(
        describe(model, kind, size=(int(example.shape[-2]), int(example.shape[-1]))) if metadata is None else metadata
    )
    info.setdefault("dynamic", _dynamic_info(model, kind, dynamic, int(example.shape[0]) if example.ndim == 4 else 1))

    def write_onnx(tmp: str) -> None:
        try:
            with torch.no_grad():
                info["exporter"] = _write_onnx(model, kind, x, dynamic, names, tmp)
        except ExportError:
            raise
        except Exception as e:
            raise _fail("torch.onnx.export", out, e) from e
        _add_onnx_metadata(tmp, info)

    def write_pt2(tmp: str) -> None:
        try:
            with torch.no_grad():
                program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(model, dynamic))
        except Exception as e:
            raise _fail("torch.export.export", out, e) from e
        info["exporter"] = f"torch.export (torch {torch.__version__})"
        torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(info)})

    atomic_write(out, write_onnx if format == "onnx" else write_pt2)
    return out


def _dynamic_info(model: nn.Module, kind: str, dynamic: bool, batch: int) -> dict[str, Any]:
    if kind == "detection":
        return {"batch": 1, "height": dynamic, "width": dynamic, "detections": True,
                "note": "one image [3, H, W] per run; the number of detections always varies"}  # fmt: skip
    if not dynamic:
        return {"batch": batch, "height": False, "width": False}
    return {"batch": True, "height": True, "width": True, "min_side": min_dynamic_side(model), "max_side": MAX_SIDE}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``pvt.*`` metadata of an exported ``.onnx`` or ``.pt2`` file (an ExportError naming the
    file when it is missing, unreadable or was not written by ``pvt export``)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file; write one with pvt export")
    if path.suffix == ".pt2":
        files = {METADATA_FILE: ""}
        try:
            torch.export.load(path, extra_files=files)
        except Exception as e:
            raise ExportError(f"{path}: not a readable torch.export program ({type(e).__name__}: {e})") from e
        if not files[METADATA_FILE]:
            raise ExportError(f"{path}: has no {METADATA_FILE} (not written by pvt export); re-export it")
        return dict(json.loads(files[METADATA_FILE]))
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]}); the file is corrupt or "
            "cut off, or not ONNX: re-export it with pvt export"
        ) from e
    meta = {
        p.key[len(METADATA_PREFIX) :]: json.loads(p.value)
        for p in proto.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }
    if "task" not in meta:
        raise ExportError(
            f"{path}: an ONNX model without pvt-vision metadata (pvt.task, pvt.input, ...): it was not written by "
            "pvt export, so its preprocessing and class names are unknown; export the model with pvt export"
        )
    return meta
