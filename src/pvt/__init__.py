"""pvt-vision: the Pyramid Vision Transformer (v1 and v2) as a backbone for dense prediction."""

from pvt.checkpoint import CheckpointError, LoadReport, load_checkpoint, save_safetensors
from pvt.models import (
    FeatureInfo,
    ModelCard,
    PyramidBackbone,
    PyramidVisionTransformer,
    PyramidVisionTransformerV2,
    create_model,
    list_models,
    model_card,
)
from pvt.models.complexity import Complexity, complexity
from pvt.version import __version__

# Task packages load on first use (`pvt.detection.retinanet(...)` after a plain `import pvt`), so
# `import pvt` stays as light as the models themselves.
_LAZY_SUBMODULES = ("classification", "detection", "segmentation", "hub", "tasks", "inference")


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"pvt.{name}")
    if name == "optimize_for_inference":  # bf16 / int8 inference (pvt.runtime.precision)
        return importlib.import_module("pvt.runtime.precision").optimize_for_inference
    if name == "predict":  # pvt.predict(model_or_weights, inputs, ...): records of a whole collection
        return importlib.import_module("pvt.inference").predict
    if name == "export":  # pvt.export(model, example, out, format=..., dynamic=...): pvt.deploy.export
        from pvt.deploy import export

        return export
    raise AttributeError(f"module 'pvt' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Complexity",
    "FeatureInfo",
    "LoadReport",
    "ModelCard",
    "PyramidBackbone",
    "PyramidVisionTransformer",
    "PyramidVisionTransformerV2",
    "__version__",
    "complexity",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_card",
    "optimize_for_inference",
    "predict",
    "save_safetensors",
]
