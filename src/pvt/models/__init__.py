"""PVT v1 and v2 backbones, their registry and ``create_model``."""

from pvt.models import pvt_v1, pvt_v2  # noqa: F401  (registers the variants)
from pvt.models.base import FeatureInfo, PyramidBackbone
from pvt.models.factory import create_model, model_for_weights
from pvt.models.pvt_v1 import PyramidVisionTransformer
from pvt.models.pvt_v2 import PyramidVisionTransformerV2
from pvt.models.registry import ModelCard, list_models, model_card

__all__ = [
    "FeatureInfo",
    "ModelCard",
    "PyramidBackbone",
    "PyramidVisionTransformer",
    "PyramidVisionTransformerV2",
    "create_model",
    "list_models",
    "model_card",
    "model_for_weights",
]
