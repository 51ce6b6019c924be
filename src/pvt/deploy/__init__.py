"""Deployment: export to ONNX / ``torch.export`` / a Triton model repository with metadata, and
exported files in ONNX Runtime."""

from pvt.deploy.exporter import export, min_dynamic_side, read_metadata
from pvt.deploy.metadata import describe
from pvt.deploy.spec import ExportError, export_spec, model_kind
from pvt.deploy.triton import export_triton

__all__ = [
    "ExportError",
    "describe",
    "export",
    "export_spec",
    "export_triton",
    "min_dynamic_side",
    "model_kind",
    "read_metadata",
]
