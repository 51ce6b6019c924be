"""The architecture guide's "Adding a task", followed for real: a fourth task (regress an image's
mean brightness) is one module here and one ``register_task`` line, and then every command works
on it: ``pvt train``, ``pvt predict``, ``pvt export`` (and predict through ONNX Runtime), and
``pvt serve``'s app, none of which names the task."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

import pvt
from pvt.checkpoint import read_checkpoint
from pvt.cli import build_parser, main
from pvt.deploy import read_metadata
from pvt.engine.config import Recipe
from pvt.engine.distributed import DistInfo, all_reduce_sum
from pvt.engine.task import ExportSpec, LoaderConfig, Predictor, Task
from pvt.tasks import register_task, task_names, unregister_task


@dataclass
class BrightnessData(LoaderConfig):
    """The task's own ``data`` section: synthetic images, generated on the fly."""

    batch_size: int = 4
    eval_batch_size: int | None = 4
    workers: int = 0
    size: int = 64
    samples: int = 8


class Flat(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Noisy grey images whose target is their mean brightness in 0..1."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.levels = torch.rand(n, generator=g)
        self.noise = 0.05 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.levels[i] + self.noise[i]).clamp(0, 1), self.levels[i]


class Regressor(nn.Module):
    """A features-only PVT, its last map pooled, one linear output: ``[B, 3, H, W]`` -> ``[B]``."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.backbone = pvt.create_model(backbone, features_only=True, out_indices=(3,))
        self.head = nn.Linear(self.backbone.feature_info.channels()[-1], 1)
        self.arch = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3))).squeeze(1)


class BrightnessPredictor(Predictor):
    def __init__(self, model: nn.Module, recipe: Recipe) -> None:
        self.model, self.size, self.classes = model.eval(), recipe.data.size, []

    def prepare(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.resize((self.size, self.size), Image.BILINEAR)).copy())
        return x.permute(2, 0, 1).float().div(255)

    def forward(self, inputs: list[torch.Tensor]) -> list[float]:
        with torch.inference_mode():
            return self.model(torch.stack(inputs)).tolist()

    def record(self, name: str, output: float, index: int = 0) -> dict[str, Any]:
        return {"image": name, "brightness": round(float(output), 5)}


class BrightnessTask(Task):
    name = "brightness"
    data_config = BrightnessData
    headline = ("mae",)

    def build_model(self, recipe: Recipe) -> nn.Module:
        model = Regressor(recipe.model.name)
        if recipe.model.checkpoint:
            model.load_state_dict(read_checkpoint(recipe.model.checkpoint)[0])
        return model

    def build_datasets(self, recipe: Recipe, *, train: bool = True) -> tuple[Dataset[Any] | None, Dataset[Any]]:
        d = recipe.data
        return (Flat(d.samples, d.size, 0) if train else None), Flat(d.samples, d.size, 1)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        return F.mse_loss(model(batch[0].to(device)), batch[1].to(device))

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, dist: DistInfo, autocast: Any
    ) -> dict[str, float]:
        total = torch.zeros(2)
        with torch.no_grad():
            for x, y in batches:
                total += torch.tensor([(model(x.to(device)).cpu() - y).abs().sum().item(), len(y)])
        error, n = all_reduce_sum(total, dist).tolist()
        return {"mae": 100 * error / n}

    def predictor(self, model: nn.Module, recipe: Recipe, artifacts: dict[str, Any]) -> Predictor:
        return BrightnessPredictor(model, recipe)

    def owns_model(self, model: nn.Module) -> bool:
        return isinstance(model, Regressor)

    def export_spec(self, model: nn.Module, recipe: Recipe | None, artifacts: dict[str, Any]) -> ExportSpec:
        size = recipe.data.size if recipe is not None else 64
        return ExportSpec(
            kind=self.name,
            module=model,
            outputs=("brightness",),
            default_size=(size, size),
            metadata={"input": {"name": "image", "layout": "NCHW", "range": "RGB in 0..1"}},
            recipe={"model": {}, "data": {"size": size}},
        )


@pytest.fixture
def brightness() -> Iterator[None]:
    register_task("brightness", BrightnessTask)  # the one registry line
    yield
    unregister_task("brightness")


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_a_new_task_trains_predicts_exports_and_serves(
    brightness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "brightness" in task_names()
    run = tmp_path / "run"
    small = ["--set", "model.name=pvt_v2_b0", "--set", "train.progress=false", "--set", "schedule.iterations=2",
             "--set", "schedule.warmup_iters=1", "--set", "train.device=cpu"]  # fmt: skip
    assert main(["train", "brightness", "--output", str(run), *small]) == 0
    weights = run / "model.safetensors"
    assert weights.is_file() and json.loads((run / "final.json").read_text())["task"] == "brightness"

    image = tmp_path / "grey.png"
    Image.fromarray(np.full((80, 96, 3), 180, np.uint8)).save(image)
    capsys.readouterr()
    assert main(["predict", "brightness", "--checkpoint", str(weights), str(image)]) == 0
    (record,) = _lines(capsys)
    assert record["image"] == str(image) and isinstance(record["brightness"], float)

    onnx = tmp_path / "brightness.onnx"
    assert main(["export", str(weights), "--task", "brightness", "--out", str(onnx), "--dynamic"]) == 0
    meta = read_metadata(onnx)
    assert meta["task"] == "brightness" and meta["recipe"] == {"model": {}, "data": {"size": 64}}
    capsys.readouterr()
    assert main(["predict", "brightness", "--runtime", "onnxruntime", "--model", str(onnx), str(image)]) == 0
    (through_onnx,) = _lines(capsys)
    assert through_onnx["brightness"] == pytest.approx(record["brightness"], abs=1e-4)

    from fastapi.testclient import TestClient

    from pvt.cli.common import _recipe
    from pvt.serve import ServeOptions, create_app, model_info

    args = build_parser().parse_args(["predict", "brightness", "--checkpoint", str(weights), str(image)])
    task, recipe = _recipe(args, "brightness", None)
    model = task.build_model(recipe).eval()
    predictor = task.predictor(model, recipe, {})
    app = create_app(predictor, model_info(task.name, recipe, model, predictor), ServeOptions("127.0.0.1", 0))
    with TestClient(app) as client:
        info = client.get("/v1/model").json()
        assert info["task"] == "brightness" and info["architecture"] == "pvt_v2_b0"
        answer = client.post("/v1/predict", files={"file": ("grey.png", image.read_bytes(), "image/png")}).json()
    assert answer["brightness"] == pytest.approx(record["brightness"], abs=1e-4)


def test_unknown_task_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'depth'; available: classification, detection, segmentation"):
        pvt.tasks.get_task("depth")
