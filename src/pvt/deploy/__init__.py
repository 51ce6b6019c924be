"""Deployment: export to ONNX / ``torch.export`` with metadata, and exported files in ONNX Runtime."""

from pvt.deploy.exporter import export, min_dynamic_side, read_metadata
from pvt.deploy.metadata import describe
from pvt.deploy.spec import ExportError, export_spec, model_kind

__all__ = ["ExportError", "describe", "export", "export_spec", "min_dynamic_side", "model_kind", "read_metadata"]
