"""Deployment: export to ONNX / ``torch.export`` with metadata, and exported files in ONNX Runtime."""

from pvt.deploy.export import ExportError, export, min_dynamic_side, model_kind, read_metadata
from pvt.deploy.metadata import describe

__all__ = ["ExportError", "describe", "export", "min_dynamic_side", "model_kind", "read_metadata"]
