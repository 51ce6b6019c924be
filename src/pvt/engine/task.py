"""The one small interface through which a task plugs into the engine.

The engine knows no task by name: it asks the task for a model, datasets, a loss per batch and
metrics on a loader, and handles everything else (optimisation, precision, distribution,
checkpoints, logging).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        """What ``pvt serve``'s ``GET /v1/model`` says of this model beyond its task and classes:
        ``architecture``, ``input_size`` and anything the web page draws with."""
        size = getattr(recipe.data, "input_size", None)
        return {"architecture": recipe.model.name, "input_size": None if size is None else [size, size]}

    def group_key(self, x: torch.Tensor) -> Hashable:
        """Inputs with the same key may share a forward: a batch of them computes exactly what
        one-by-one forwards would. By default, inputs of the same shape."""
        return tuple(x.shape)

    def write_files(self, out: Path, stem: str, x: torch.Tensor, output: Any, pictures: bool) -> dict[str, str]:
        """Files of one image under ``out`` (``stem``: its id without the suffix, so ``sub/a`` for
        ``sub/a.jpg``), named in its record; ``pictures``: also the pictures a person looks at
        (``pvt predict --save-pictures``). None by default."""
        return {}

    def extras(self, image: torch.Tensor, output: Any) -> dict[str, Any]:
        """Extra fields of ``pvt serve``'s answer for one image (``image``: ``prepare``'s input, for
        pictures drawn over it); none by default."""
        return {}


@dataclass
class ExportSpec:
    """How a task's model goes through ``pvt export`` and comes back in ``--runtime onnxruntime``.

    The exporter (``pvt.deploy``) knows no task: it traces ``module`` on an example of the shape
    this spec says and stores ``metadata`` (input, outputs, preprocessing, ...) in the file.
    """

    kind: str  # the file's task: a task name, or "features" for a bare four-map backbone
    module: nn.Module  # what is traced: the model, or a wrapper taking / returning tensors
    outputs: tuple[str, ...] = ("logits",)
    one_image: bool = False  # takes one [3, H, W] image per run (else a batch [B, 3, H, W])
    torchscript: bool = False  # data-dependent output sizes: the TorchScript exporter, no pt2
    default_size: tuple[int, int] = (224, 224)  # the example's size when none is given
    metadata: dict[str, Any] = field(default_factory=dict)  # input, outputs, preprocess, ... (JSON)
    recipe: dict[str, Any] = field(default_factory=dict)  # {"model": {...}, "data": {...}} pvt predict sets
    classes: list[str] | None = None  # the class names pvt predict would print
    refuse: str | None = None  # why this model cannot be exported faithfully (the message), else None
    no_pt2: str | None = None  # why it cannot go to pt2 (torchscript models), else None
    varying_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # TorchScript: always-varying dims
    size_axes: dict[str, dict[int, str]] = field(default_factory=dict)  # TorchScript: dims varying with --dynamic
    dynamic_info: dict[str, Any] = field(default_factory=dict)  # one-image files: more of metadata["dynamic"]


@dataclass
class WholeModel:
    """A whole model read and converted by ``Task.read_whole_model``, ready to be written once: its
    tensors in this project's names, its safetensors header, the recipe's ``model`` section for it,
    whether the source was this project's own file (its run's ``config.yaml`` is then its recipe),
    and a report for people."""

    state_dict: dict[str, torch.Tensor]
    header: dict[str, str]  # "arch" included
    model: dict[str, Any]
    own: bool
    report: str


class Task(ABC):
    """Subclass per task: classification, detection, segmentation.

    Everything outside the engine that differs per task asks the task through a hook here (or the
    predictor, or the model), never by testing its name: a new task is one package and one line in
    the registry (``pvt.tasks``).
    """

    name: str
    data_config: type[LoaderConfig]
    model_config: type[ModelConfig] = ModelConfig
    headline: tuple[str, ...]  # metrics copied to final.json (percent)
    hub_task: str | None = None  # published whole models: their task in the weights table (``coco``)
    default_preset: str | None = None  # what ``pvt train TASK`` runs without --preset

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

    def predictor(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> Predictor:
        """What ``pvt predict`` / ``pvt.predict`` and ``pvt serve`` run per batch of images;
        ``artifacts`` is the run's ``task.json``."""
        raise NotImplementedError(f"{self.name} has no predictor yet")

    def param_group_kwargs(self) -> dict[str, Any]:
        """Where the head and the PVT backbone live in this task's model (for param groups)."""
        return {}

    # Whole models (a detector or segmenter file, not just a backbone): conversion and published recipes.

    def claims_checkpoint(self, keys: Sequence[str], meta: Mapping[str, str]) -> bool:
        """Whether a checkpoint with these tensor names and header metadata is a whole model of this task."""
        return False

    def read_whole_model(self, src: str, *, allow_nonfinite: bool = False) -> WholeModel:
        """Read a whole model of this task (``claims_checkpoint``) and convert it to this project's
        names, load-checked; ``pvt.tasks.convert_whole_model`` writes it."""
        raise NotImplementedError(f"{self.name} has no whole-model conversion")

    def paper_preset(self, model: Mapping[str, Any]) -> str | None:
        """The shipped preset holding the papers' recipe for this ``model`` section, if any."""
        return None

    def published_arch(self, model: Mapping[str, Any]) -> str | None:
        """The ``arch`` of this task's published whole models to look up (``model``: the flags' model fields)."""
        return None

    def published_model_fields(self, source: Any) -> dict[str, Any]:
        """Recipe ``model`` fields a published whole model's row implies (a ``pvt.hub.WeightsSource``)."""
        return {}

    # Export (pvt export, pvt.export) and exported files (--runtime onnxruntime).

    def owns_model(self, model: nn.Module) -> bool:
        """Whether ``model`` is one of this task's models (``pvt.export(model, ...)`` asks each task)."""
        return False

    def export_spec(self, model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
        """How ``model`` (built from ``recipe``, or None for a model without one) is exported."""
        raise NotImplementedError(f"{self.name} has no export")

    def write_derived(self, out: Path, records: Iterable[dict[str, Any]]) -> list[Path]:
        """Files made from all of a prediction run's records once it is complete (a detector's COCO
        ``results.json``); returns their paths. None by default."""
        return []

    def artifacts_from_export(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The ``task.json`` an exported file's metadata stands for (its class names by default)."""
        artifacts = dict(meta.get("artifacts") or {})
        if meta.get("classes"):
            artifacts["classes"] = meta["classes"]
        return artifacts
