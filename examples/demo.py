"""``make demo``: the measured zoo table, multi-scale features of a real photo, then real tasks:
train the ``digits`` classification preset (about a minute) and the ``shapes-retinanet`` detection
preset (about 10 minutes) end to end on this CPU, evaluate them, and draw curves and predictions.
With ``--segmentation`` it also trains the ``shapes-semantic-fpn`` preset (about 12 minutes more).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvt.models import create_model
from pvt.models.zoo import zoo_table
from pvt.utils.constants import IMAGENET_MEAN as MEAN
from pvt.utils.constants import IMAGENET_STD as STD


def load_photo() -> tuple[str, torch.Tensor]:
    """A real photo shipped inside scikit-image (no download): ``[1, 3, H, W]`` normalised."""
    from skimage import data

    image = data.coffee()  # 400 x 600 RGB, uint8
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return "skimage.data.coffee()", x.unsqueeze(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__)
    parser.add_argument("runs", nargs="?", type=Path, default=Path("runs"), help="where the runs go")
    parser.add_argument("--segmentation", action="store_true", help="also train shapes-semantic-fpn (~12 min)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("Model zoo, measured from the code (params with the 1000-class head; GMACs are the")
    print("papers' GFLOPs convention, see pvt.complexity):\n")
    print(zoo_table())

    name, x = load_photo()
    print(f"\nMulti-scale features of {name}, input {list(x.shape)}:")
    for arch in ("pvt_small", "pvt_v2_b2", "pvt_v2_b2_li"):
        model = create_model(arch, features_only=True).eval()
        start = time.perf_counter()
        with torch.inference_mode():
            feats = model(x)
        ms = (time.perf_counter() - start) * 1e3
        shapes = "  ".join(
            f"s{info.reduction}: {list(f.shape)}" for info, f in zip(model.feature_info, feats, strict=True)
        )
        print(f"  {arch:<13} {shapes}  ({ms:.0f} ms)")

    train_digits(args.runs / "demo-digits")
    train_shapes(args.runs / "demo-shapes-retinanet")
    if args.segmentation:
        train_segmentation(args.runs / "demo-shapes-semantic-fpn")


def _train(task: str, preset: str, run_dir: Path, what: str) -> float:
    """Train a shipped preset into a fresh ``run_dir`` through the CLI; minutes taken."""
    from pvt.cli import main as cli

    if run_dir.exists():
        print(f"\n(removing the previous demo run in {run_dir})")
        shutil.rmtree(run_dir)
    print(f"\nTraining the '{preset}' preset into {run_dir} ({what}):")
    start = time.perf_counter()
    if cli(["train", task, "--preset", preset, "--output", str(run_dir)]) != 0:
        raise SystemExit(1)
    return (time.perf_counter() - start) / 60


def _trained(task_name: str, run_dir: Path) -> tuple[Any, Any, Any]:
    """(task, recipe, model with the run's final weights) for drawing pictures."""
    from pvt.engine import load_recipe
    from pvt.engine.config import read_yaml
    from pvt.tasks import get_task

    task = get_task(task_name)
    sets = [f"model.checkpoint={run_dir / 'model.safetensors'}"]
    recipe = load_recipe(task_name, task.data_config, read_yaml(run_dir / "config.yaml"), sets,
                         model_cls=task.model_config)  # fmt: skip
    return task, recipe, task.build_model(recipe)


def train_digits(run_dir: Path) -> None:
    """Train and evaluate the embedded digits preset (PVT v2-b0 from scratch, about a CPU minute)."""
    minutes = _train("classification", "digits", run_dir, "scikit-learn's handwritten digits, held-out split")
    print(f"trained and evaluated in {minutes:.1f} min; curves: {run_dir / 'curves.png'}")
    print("evaluate again with:  pvt eval classification --checkpoint", run_dir / "model.safetensors")


def train_shapes(run_dir: Path) -> None:
    """Train RetinaNet on PVT v2-b0 on the synthetic scenes, score COCO AP, draw predictions vs truth."""
    from pvt.detection.visualize import predictions_vs_truth

    minutes = _train("detection", "shapes-retinanet", run_dir, "synthetic scenes, COCO box AP")
    task, recipe, model = _trained("detection", run_dir)
    _, val = task.build_datasets(recipe, train=False)
    png = predictions_vs_truth(model, val, run_dir / "predictions.png")
    print(f"trained and evaluated in {minutes:.1f} min; predictions (right) vs truth (left): {png}")


def train_segmentation(run_dir: Path) -> None:
    """Train Semantic FPN on PVT v2-b0 on the scenes' label maps, score mIoU, draw predictions vs truth."""
    from pvt.segmentation.visualize import predictions_vs_truth

    minutes = _train("segmentation", "shapes-semantic-fpn", run_dir, "synthetic scenes' label maps, mIoU")
    task, recipe, model = _trained("segmentation", run_dir)
    _, val = task.build_datasets(recipe, train=False)
    png = predictions_vs_truth(model, val, run_dir / "predictions.png", **task.infer_kwargs(recipe.data))
    print(f"trained and evaluated in {minutes:.1f} min; image | truth | prediction: {png}")


if __name__ == "__main__":
    main()
