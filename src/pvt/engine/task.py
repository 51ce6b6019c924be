"""The one small interface through which a task plugs into the engine.

The engine knows no task by name: it asks the task for a model, datasets, a loss per batch and
metrics on a loader, and handles everything else (optimisation, precision, distribution,
checkpoints, logging).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pvt.engine.config import ModelConfig, Recipe
from pvt.engine.distributed import DistInfo

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class LoaderConfig:
    """Fields every task's ``data`` section has (the engine builds the loaders from them)."""

    batch_size: int = 128  # per process
    eval_batch_size: int | None = None  # default 1.5x batch_size
    workers: int = 4


class Predictor(ABC):
    """A model's predictions on decoded images, a batch at a time: the one code path behind
    ``pvt predict`` (files, one by one) and ``pvt serve`` (uploads, in dynamic batches)."""

    classes: list[str]  # class names, in the order of the model's outputs

    @abstractmethod
    def prepare(self, image: Image) -> torch.Tensor:
        """An RGB image -> the model's input for it (CPU work, done before batching)."""

    @abstractmethod
    def forward(self, inputs: list[torch.Tensor]) -> list[Any]:
        """The raw prediction of each input, computed as one batch."""

    @abstractmethod
    def record(self, name: str, output: Any, index: int = 0) -> dict[str, Any]:
        """The JSON record of one image (``index``: its position among the inputs, for ids)."""


class Task(ABC):
    """Subclass per task: classification, detection, segmentation."""

    name: str
    data_config: type[LoaderConfig]
    model_config: type[ModelConfig] = ModelConfig
    headline: tuple[str, ...]  # metrics copied to final.json (percent)

    @abstractmethod
    def build_model(self, recipe: Recipe) -> nn.Module: ...

    @abstractmethod
    def build_datasets(self, recipe: Recipe, *, train: bool = True) -> tuple[Dataset[Any] | None, Dataset[Any]]:
        """(train dataset or None when ``train`` is False, evaluation dataset)."""

    def collate(self, batch: list[Any]) -> Any:
        return torch.utils.data.default_collate(batch)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """One micro-batch's training loss (a scalar); the engine handles autocast and backward."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        device: torch.device,
        dist: DistInfo,
        autocast: Callable[[], Any],
    ) -> dict[str, float]:
        """Metrics over the whole evaluation set, reduced across ranks (percent where a ratio)."""

    def group_ids(self, train_ds: Dataset[Any]) -> list[int] | None:
        """Optional group per training sample; batches are then drawn within one group."""
        return None

    def artifacts(self) -> dict[str, Any]:
        """What predictions need later about the training data (class names, ...): ``task.json``."""
        return {}

    def predict(
        self,
        model: nn.Module,
        recipe: Recipe,
        inputs: list[str],
        artifacts: dict[str, Any],
        out_dir: str | None,
    ) -> list[dict[str, Any]]:
        """Predictions for image files, one record per image (written under ``out_dir`` if set)."""
        raise NotImplementedError(f"{self.name} has no predict yet")

    def predictor(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> Predictor:
        """What ``predict`` runs per batch of images; ``artifacts`` is the run's ``task.json``."""
        raise NotImplementedError(f"{self.name} has no predictor yet")

    def param_group_kwargs(self) -> dict[str, Any]:
        """Where the head and the PVT backbone live in this task's model (for param groups)."""
        return {}
