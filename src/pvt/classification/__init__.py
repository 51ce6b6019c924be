"""Image classification (ImageFolder, the papers' ImageNet recipe, the embedded digits set)."""

from pvt.classification.data import CheckedImageFolder, ClassificationData, DataError, export_digits
from pvt.classification.task import ClassificationTask

__all__ = ["CheckedImageFolder", "ClassificationData", "ClassificationTask", "DataError", "export_digits"]
