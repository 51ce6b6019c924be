"""ImageNet-style classification on the engine: PVT classifier, mixup / label smoothing, top-1 / top-5."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pvt.classification.data import (
    ClassificationData,
    build_datasets,
    build_transforms,
    eval_data,
    imagenet_source,
)
from pvt.engine.config import Recipe
from pvt.engine.distributed import DistInfo, all_reduce_sum
from pvt.engine.task import ExportSpec, Predictor, Task
from pvt.models import PyramidBackbone, create_model

if TYPE_CHECKING:
    from PIL.Image import Image


class ClassificationTask(Task):
    name = "classification"
    data_config = ClassificationData
    headline = ("top1", "top5")
    default_preset = "digits"  # the embedded handwritten digits

    def __init__(self) -> None:
        self._mixup: Any = None

    def build_model(self, recipe: Recipe) -> nn.Module:
        m = recipe.model
        kwargs: dict[str, Any] = {}
        if m.img_size is not None:
            kwargs["img_size"] = m.img_size
        model = create_model(
            m.name,
            num_classes=m.num_classes,
            drop_path_rate=m.drop_path_rate,
            pretrained=m.pretrained,
            checkpoint=m.checkpoint,
            allow_nonfinite=m.allow_nonfinite,
            **kwargs,
        )
        if model.load_report is not None:
            print(model.load_report, file=sys.stderr)
        if m.freeze_stages:
            model.freeze_stages(m.freeze_stages)
        data: ClassificationData = recipe.data
        if data.mixup > 0 or data.cutmix > 0:
            from timm.data.mixup import Mixup

            self._mixup = Mixup(
                mixup_alpha=data.mixup,
                cutmix_alpha=data.cutmix,
                prob=data.mixup_prob,
                switch_prob=data.mixup_switch_prob,
                mode="batch",
                label_smoothing=data.smoothing,
                num_classes=m.num_classes,
            )
        self._smoothing = data.smoothing
        return model

    def build_datasets(self, recipe: Recipe, *, train: bool = True) -> tuple[Dataset[Any] | None, Dataset[Any]]:
        # Evaluating published weights: their own eval transform (training keeps the recipe's).
        train_ds, val_ds = build_datasets(recipe.data if train else eval_data(recipe), train=train)
        self._classes = val_ds.classes
        n = len(val_ds.classes)
        if n > recipe.model.num_classes:
            raise ValueError(
                f"the data has {n} classes but model.num_classes={recipe.model.num_classes}; "
                f"set --set model.num_classes={n}"
            )
        return train_ds, val_ds

    def artifacts(self) -> dict[str, Any]:
        return {"classes": list(getattr(self, "_classes", []))}

    def predictor(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> Predictor:
        return ClassificationPredictor(model, recipe, artifacts)

    def owns_model(self, model: nn.Module) -> bool:
        return isinstance(model, PyramidBackbone)  # a classifier, or a features-only backbone

    def export_spec(self, model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
        from pvt.classification.export import export_spec

        return export_spec(model, recipe, artifacts)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if self._mixup is not None and images.shape[0] % 2 == 0:
            images, soft = self._mixup(images, targets)
            logits = model(images)
            return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        logits = model(images)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self._smoothing)

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        device: torch.device,
        dist: DistInfo,
        autocast: Callable[[], Any],
    ) -> dict[str, float]:
        # [correct@1, correct@5, count, loss sum], summed over ranks.
        acc = torch.zeros(4, dtype=torch.float64, device=device)
        for images, targets in batches:
            images, targets = images.to(device), targets.to(device)
            with autocast():
                logits = model(images).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(targets[:, None])
            acc[0] += hit[:, 0].sum()
            acc[1] += hit.any(dim=1).sum()
            acc[2] += targets.numel()
            acc[3] += F.cross_entropy(logits, targets, reduction="sum")
        all_reduce_sum(acc, dist)
        n = max(acc[2].item(), 1.0)
        return {
            "top1": 100.0 * acc[0].item() / n,
            "top5": 100.0 * acc[1].item() / n,
            "loss": acc[3].item() / n,
            "count": acc[2].item(),
        }


class ClassificationPredictor(Predictor):
    """The evaluation transform, a batched forward and the top-5 record."""

    def __init__(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> None:
        self.model = model.eval()
        self.transform = build_transforms(eval_data(recipe), train=False)
        self.classes = list(artifacts.get("classes") or [])
        if not self.classes and imagenet_source(recipe) is not None:
            from pvt.hub import imagenet_classes

            self.classes = list(imagenet_classes())

    def prepare(self, image: Image) -> torch.Tensor:
        return self.transform(image)  # type: ignore[no-any-return]

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.stack(inputs).to(next(self.model.parameters()).device)
        with torch.inference_mode():
            return list(self.model(x).float().softmax(dim=-1).cpu())

    def record(self, name: str, output: torch.Tensor, index: int = 0) -> dict[str, Any]:
        top = output.topk(min(5, output.numel()))
        classes = self.classes
        return {
            "image": name,
            "top5": [
                {"label": classes[i] if i < len(classes) else str(i), "index": i, "prob": round(p, 5)}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ],
        }
