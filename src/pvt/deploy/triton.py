"""A Triton Inference Server model repository for an exported model: ``REPO/NAME/config.pbtxt`` and
``REPO/NAME/1/model.onnx``, served by Triton's ONNX Runtime backend.

The config is read off the ONNX graph Triton will load (tensor names, element types, dims), not off
the ``ExportSpec``, so the two cannot disagree. A file exported with a dynamic batch gets Triton's
batching (``max_batch_size`` > 0, the batch dim left out of ``dims``, ``dynamic_batching``); every
other file (a detector's one image per run, a fixed ``--batch``) gets ``max_batch_size: 0`` and its
full dims: Triton batches only requests of equal shapes, which a detector's any-size images are not.
The file's ``pvt.*`` metadata (preprocessing, class names, ...) is copied into ``parameters``, key
for key, each value the same JSON string, so that a Triton client reads what an ONNX Runtime one does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pvt.deploy.exporter import METADATA_PREFIX, export
from pvt.deploy.spec import ExportError
from pvt.utils.files import atomic_write

DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}  # --triton-device -> instance_group kind
DEFAULT_MAX_BATCH = 8  # the largest batch the dynamic batcher forms (overridable)
VERSION = "1"  # Triton serves the highest numbered version folder; an export writes the first
MODEL_FILE = "model.onnx"  # the ONNX Runtime backend's default_model_filename
CONFIG_FILE = "config.pbtxt"
# ONNX TensorProto element type name -> Triton DataType (model_config.proto).
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16",
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "BFLOAT16": "TYPE_BF16",
    "STRING": "TYPE_STRING",
}
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TritonTensor:
    """One ``input`` / ``output`` entry: its name, Triton data type and dims (-1: any size)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def triton_type(elem_type: int) -> str:
    """The Triton ``TYPE_*`` of an ONNX element type (``onnx.TensorProto.FLOAT`` -> ``TYPE_FP32``)."""
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        name = "?"
    if name not in TRITON_TYPES:
        raise ExportError(
            f"ONNX element type {name} ({elem_type}) has no Triton data type; Triton takes {', '.join(TRITON_TYPES)}"
        )
    return TRITON_TYPES[name]


def _tensor(value: Any) -> TritonTensor:
    """A graph input / output (``onnx.ValueInfoProto``) as Triton sees it: a named dim (``batch``,
    ``height``, ``detections``, or an exporter's ``s0``) or a missing one is -1."""
    t = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return TritonTensor(value.name, triton_type(t.elem_type), dims)


def graph_tensors(proto: Any) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """(inputs, outputs) of an ``onnx.ModelProto``. Weights listed as graph inputs (old exporters'
    ``keep_initializers_as_inputs``) are not inputs a client feeds, so they are left out."""
    weights = {w.name for w in proto.graph.initializer}
    inputs = [_tensor(v) for v in proto.graph.input if v.name not in weights]
    return inputs, [_tensor(v) for v in proto.graph.output]


def _batched(inputs: Sequence[TritonTensor], outputs: Sequence[TritonTensor], meta: Mapping[str, Any]) -> bool:
    """Whether the file takes a batch of any size, which Triton's batcher needs as dim 0 of every
    input and output. The metadata says it (``dynamic.batch`` is True only for a dynamic export of a
    batched model); the graph must then agree, else Triton would refuse the config at load."""
    if (meta.get("dynamic") or {}).get("batch") is not True:
        return False
    fixed = [t.name for t in (*inputs, *outputs) if not t.dims or t.dims[0] != -1]
    if fixed:
        raise ExportError(
            f"the metadata says the batch is dynamic but {', '.join(fixed)} have no dynamic first dim in the graph; "
            "re-export it with pvt export --dynamic"
        )
    return True


def default_name(meta: Mapping[str, Any]) -> str:
    """The model's name in the repository: its architecture (``pvt_v2_b0``, ``retinanet_pvt_v2_b0``,
    ``semantic_fpn_pvt_v2_b2``), ``_features`` added for a features-only backbone, which shares its
    classifier's architecture name."""
    arch = str(meta.get("arch") or "model")
    name = f"{arch}_features" if meta.get("task") == "features" else arch
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def check_name(name: str) -> str:
    """``name`` if it can be a model folder of the repository (Triton's model name is its folder's)."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ExportError(
            f"Triton model name {name!r}: it names the model's folder in the repository, so use letters, digits "
            "and _ . - only (e.g. pvt_v2_b0)"
        )
    return name


def _quote(text: str) -> str:
    """A protobuf text-format string literal (C escapes; JSON values keep their own backslashes)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _tensor_block(t: TritonTensor, batched: bool) -> str:
    # With batching, Triton's dims exclude the batch dim it adds itself (dims [3, -1, -1] means
    # [B, 3, H, W] on the wire, B up to max_batch_size).
    dims = t.dims[1:] if batched else t.dims
    return (
        f"  {{\n    name: {_quote(t.name)}\n    data_type: {t.data_type}\n"
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
    )


def render_config(
    name: str,
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    *,
    max_batch_size: int,
    device: str,
    parameters: Mapping[str, str],
) -> str:
    """The ``config.pbtxt`` text (Triton's ``ModelConfig`` in protobuf text format).
    ``max_batch_size`` 0: no batching, dims are the full shapes, no ``dynamic_batching``."""
    batched = max_batch_size > 0
    lines = [
        f"name: {_quote(name)}",
        # backend picks the ONNX Runtime backend; platform is its older name, which tools still read.
        'backend: "onnxruntime"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t, batched) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t, batched) for t in outputs) + "\n]",
    ]
    if batched:
        # Triton's defaults: batches formed from whatever is queued, no added delay.
        lines.append("dynamic_batching { }")
    lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {DEVICES[device]}\n  }}\n]")
    for key, value in parameters.items():
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(lines) + "\n"


def _check_options(device: str, max_batch_size: int) -> None:
    if device not in DEVICES:
        raise ExportError(f"Triton device {device!r}: expected one of {', '.join(DEVICES)}")
    if max_batch_size < 1:
        raise ExportError(f"Triton max_batch_size {max_batch_size}: must be 1 or more (the batcher's largest batch)")


def write_config(folder: str | Path, *, device: str = "cpu", max_batch_size: int = DEFAULT_MAX_BATCH) -> Path:
    """Write ``folder/config.pbtxt`` for ``folder/1/model.onnx`` (a file written by ``pvt export``).
    The model's name is the folder's: Triton refuses a config whose name differs from its folder.
    Returns the config's path."""
    import onnx

    folder = Path(folder)
    _check_options(device, max_batch_size)
    name = check_name(folder.name)
    path = folder / VERSION / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no such file; a Triton model folder holds {VERSION}/{MODEL_FILE} (pvt export)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]}); re-export it"
        ) from e
    # The metadata_props values are JSON already (pvt.deploy.exporter): copied as they are.
    props = {p.key: p.value for p in proto.metadata_props if p.key.startswith(METADATA_PREFIX)}
    if METADATA_PREFIX + "task" not in props:
        raise ExportError(
            f"{path}: an ONNX model without pvt-vision metadata: its preprocessing and class names are unknown; "
            "export the model with pvt export --format triton"
        )
    meta = {k[len(METADATA_PREFIX) :]: json.loads(v) for k, v in props.items()}
    inputs, outputs = graph_tensors(proto)
    text = render_config(
        name,
        inputs,
        outputs,
        max_batch_size=max_batch_size if _batched(inputs, outputs, meta) else 0,
        device=device,
        parameters=props,
    )
    out = folder / CONFIG_FILE
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


def export_triton(
    model: nn.Module,
    example: Tensor,
    repo: str | Path,
    *,
    name: str | None = None,
    device: str = "cpu",
    max_batch_size: int = DEFAULT_MAX_BATCH,
    dynamic: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``model`` (as ``pvt.deploy.export`` does, ONNX) into the Triton model repository
    ``repo``: ``repo/NAME/1/model.onnx`` and ``repo/NAME/config.pbtxt``; returns ``repo/NAME``.

    ``name``: the model's name (default: ``default_name`` of its metadata). ``device``: ``cpu`` or
    ``gpu`` (the instance group's kind). ``max_batch_size``: the largest batch Triton forms for a
    file exported with ``dynamic=True`` (other files take their exported shape and are not batched).
    """
    from pvt.deploy.metadata import describe

    repo = Path(repo)
    _check_options(device, max_batch_size)  # before the export: it can take minutes
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"{repo}: is a file; --format triton writes a model repository folder (--out REPO)")
    if name is None:
        meta = metadata if metadata is not None else describe(model, size=(example.shape[-2], example.shape[-1]))
        name = default_name(meta)
    folder = repo / check_name(name)
    export(model, example, folder / VERSION / MODEL_FILE, format="onnx", dynamic=dynamic, metadata=metadata)
    write_config(folder, device=device, max_batch_size=max_batch_size)
    return folder


__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEVICES",
    "TritonTensor",
    "check_name",
    "default_name",
    "export_triton",
    "graph_tensors",
    "render_config",
    "triton_type",
    "write_config",
]
