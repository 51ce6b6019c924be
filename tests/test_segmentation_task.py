"""Segmentation through the engine: a short training run, evaluation, prediction files, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_two_ranks
from pvt.cli import main as cli_main

SMALL = ["data.shapes={image_size: 64, train_images: 8, val_images: 4, min_size: 12, max_size: 40}",
         "model.fpn_channels=32", "model.head_channels=32", "data.scale=[128,64]", "data.crop_size=[64,64]",
         "data.eval_scale=[128,64]", "schedule.iterations=2", "schedule.warmup_iters=1", "data.batch_size=4",
         "train.progress=false", "train.log_every=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("PVT_CACHE", str(root))
    return root


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def test_short_training_run_eval_and_predict(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["train", "segmentation", "--preset", "shapes-semantic-fpn", "--output", str(run)]
    assert cli_main([*args, *_sets(SMALL)]) == 0
    final = json.loads((run / "final.json").read_text())
    assert {"mIoU", "mAcc", "aAcc"} <= set(final) and final["iterations"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"iou/background", "iou/star", "acc/circle"} <= set(records[-1])
    assert json.loads((run / "task.json").read_text())["classes"] == ["background", "circle", "square",
                                                                      "triangle", "star"]  # fmt: skip

    capsys.readouterr()
    weights = str(run / "model.safetensors")
    assert cli_main(["eval", "segmentation", "--checkpoint", weights]) == 0
    assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(final["mIoU"], abs=1e-3)
    # Test-time flip and two scales run through the same command.
    tta = ["--set", "data.eval_flip=true", "--set", "data.eval_ratios=[0.75,1.0]"]
    assert cli_main(["eval", "segmentation", "--checkpoint", weights, *tta]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["mIoU"] <= 100

    image = next(cache.rglob("val2017/000000.png"))
    out = tmp_path / "pred"
    assert cli_main(["predict", "segmentation", "--checkpoint", weights, "--out", str(out), "--save-pictures",
                     str(image)]) == 0  # fmt: skip
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert record["image"] == str(image) and sum(record["classes"].values()) == pytest.approx(1.0, abs=1e-3)
    label = Image.open(out / "000000_label.png")
    assert label.mode == "P" and label.size == (64, 64)
    assert set(np.unique(np.asarray(label)).tolist()) <= set(range(5))
    assert Image.open(out / "000000_overlay.png").size == (64, 64)

    # The written label map is the model's argmax, class for class.
    from pvt.engine import load_recipe
    from pvt.engine.config import read_yaml
    from pvt.segmentation import predict_labels
    from pvt.tasks import get_task

    task = get_task("segmentation")
    recipe = load_recipe("segmentation", task.data_config, read_yaml(run / "config.yaml"),
                         [f"model.checkpoint={weights}"], model_cls=task.model_config)  # fmt: skip
    model = task.build_model(recipe).eval()
    x = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    expected = predict_labels(model, x, scale=(128, 64))
    assert np.array_equal(np.asarray(label), expected.numpy())

    # The demo's picture: one row per validation image (image | truth | prediction).
    from pvt.segmentation.visualize import predictions_vs_truth

    _, val = task.build_datasets(recipe, train=False)
    png = predictions_vs_truth(model, val, tmp_path / "pv.png", count=2, **task.infer_kwargs(recipe.data))
    assert Image.open(png).size == (3 * 64 + 8, 2 * (64 + 4))


def test_two_process_ddp_reduces_the_confusion_matrix(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two gloo ranks train in step (BatchNorm statistics included); mIoU from the summed confusion
    matrix equals one process's."""
    final = train_two_ranks(tmp_path, cache, "segmentation", "shapes-semantic-fpn", [*SMALL, "data.batch_size=2"])
    capsys.readouterr()
    assert cli_main(["eval", "segmentation", "--checkpoint", str(tmp_path / "run" / "model.safetensors")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert final["aAcc"] > 0 and all(final[k] == pytest.approx(single[k], abs=1e-3) for k in ("mIoU", "aAcc"))


def test_bad_settings_and_wrong_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pvt import create_model, save_safetensors

    weights = tmp_path / "backbone.safetensors"
    save_safetensors(create_model("pvt_v2_b0").state_dict(), weights)
    base = ["eval", "segmentation", "--preset", "shapes-semantic-fpn", *_sets(SMALL[:6])]
    assert cli_main([*base, "--checkpoint", str(weights)]) == 2
    assert "backbone.safetensors: not a whole Semantic FPN" in capsys.readouterr().err
    run = tmp_path / "run"
    args = ["train", "segmentation", "--preset", "shapes-semantic-fpn", "--output", str(run)]
    assert cli_main([*args, *_sets([*SMALL, "data.eval_mode=tiles"])]) == 2
    assert "data.eval_mode='tiles': expected 'whole' or 'slide'" in capsys.readouterr().err
    assert (
        cli_main(["train", "segmentation", "--preset", "semantic-fpn-pvt_small-40k", "--output", str(run / "x")]) == 2
    )
    assert "data.root is not set" in capsys.readouterr().err
