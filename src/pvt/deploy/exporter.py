"""Export a model to ONNX or to a ``torch.export`` program (``.pt2``), with what a consumer needs
to feed it carried in the file.

The model's task says how (``Task.export_spec``): what is traced, its outputs, whether it takes a
batch or one image, and the metadata. Models go through ``torch.onnx.export(..., dynamo=True)``
(built on ``torch.export``), so batch, height and width can be symbolic; a task whose outputs have
data-dependent sizes (RetinaNet and Mask R-CNN: score threshold, ``topk(min(k, n))``, NMS, on which
``torch.export`` cannot guard) asks for the TorchScript exporter (``dynamo=False``, the path
torchvision's own ONNX tests cover), and cannot go to ``pt2``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvt.deploy.spec import ExportError, export_spec
from pvt.engine.task import ExportSpec
from pvt.utils.files import atomic_write

FORMATS = ("onnx", "pt2")
METADATA_FILE = "pvt_metadata.json"  # inside a .pt2 archive (torch.export.save's extra_files)
METADATA_PREFIX = "pvt."  # ONNX metadata_props keys
TORCHSCRIPT_OPSET = 17
MAX_SIDE = 16384  # upper bound of a dynamic height / width


def min_dynamic_side(model: nn.Module) -> int:
    """Smallest height / width a dynamic export accepts.

    Exporters treat a dimension of size 1 as broadcastable and fix it, so a symbolic side must keep
    every stage's token grid and every spatial reduction's key / value grid at 2 or more (PVT v2:
    61 px, from stage 1's 8x reduction; b2-li's pooled 7x7 keys need no more than its grids).
    """
    from pvt.layers.blocks import Attention
    from pvt.models import PyramidBackbone

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


def _example(model: nn.Module, spec: ExportSpec, example: Tensor, dynamic: bool) -> Tensor:
    """Check the example's shape; a dynamic batched export traces batch 2 (a traced batch of 1 is
    fixed to 1 by the exporter, see ``min_dynamic_side``)."""
    if spec.one_image:
        if example.ndim == 4 and example.shape[0] == 1:
            example = example[0]
        if example.ndim != 3 or example.shape[0] != 3:
            raise ExportError(
                f"a {spec.kind} model exports for one RGB image [3, H, W] in 0..1, got shape {tuple(example.shape)}; "
                "batches are not supported: it loops over a list of images in Python (torchvision's detectors), so "
                "a traced file would hold a fixed number of images; run the file once per image"
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


def _write_onnx(model: nn.Module, spec: ExportSpec, x: Tensor, dynamic: bool, tmp: str) -> str:
    """Write the ONNX graph to ``tmp``; returns the exporter used."""
    names = list(spec.outputs)
    if spec.torchscript:
        axes: dict[str, dict[int, str]] = dict(spec.varying_axes)
        if dynamic:
            axes.update(spec.size_axes)
        torch.onnx.export(
            spec.module.eval(),
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
        spec.module,
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
    model = model.eval()
    spec = export_spec(model)
    if format == "pt2" and spec.torchscript:
        why = spec.no_pt2 or "it needs the TorchScript exporter"
        raise ExportError(f"{out}: a {spec.kind} model cannot be exported to pt2: {why}")
    if spec.refuse is not None:
        raise ExportError(f"{out}: {spec.refuse}")
    example = example.detach().to("cpu", torch.float32)
    x = _example(model, spec, example, dynamic)
    size = (int(example.shape[-2]), int(example.shape[-1]))
    info: dict[str, Any] = dict(describe(model, size=size, spec=spec) if metadata is None else metadata)
    info.setdefault("dynamic", _dynamic_info(model, spec, dynamic, int(example.shape[0]) if example.ndim == 4 else 1))

    def write_onnx(tmp: str) -> None:
        try:
            with torch.no_grad():
                info["exporter"] = _write_onnx(model, spec, x, dynamic, tmp)
        except ExportError:
            raise
        except Exception as e:
            raise _fail("torch.onnx.export", out, e) from e
        _add_onnx_metadata(tmp, info)

    def write_pt2(tmp: str) -> None:
        try:
            with torch.no_grad():
                program = torch.export.export(spec.module, (x,), dynamic_shapes=_dynamic_shapes(model, dynamic))
        except Exception as e:
            raise _fail("torch.export.export", out, e) from e
        info["exporter"] = f"torch.export (torch {torch.__version__})"
        torch.export.save(program, tmp, extra_files={METADATA_FILE: json.dumps(info)})

    atomic_write(out, write_onnx if format == "onnx" else write_pt2)
    return out


def _dynamic_info(model: nn.Module, spec: ExportSpec, dynamic: bool, batch: int) -> dict[str, Any]:
    if spec.one_image:
        return {"batch": 1, "height": dynamic, "width": dynamic, **spec.dynamic_info}
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
