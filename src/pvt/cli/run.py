"""``pvt train``, ``eval``, ``presets``, ``plot``: every task's runs, through its ``Task``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pvt.cli.common import (
    _add_allow_nonfinite,
    _add_precision_args,
    _add_pretrained_arg,
    _add_recipe_args,
    _add_runtime_args,
    _no_precision_for_onnx,
    _precision_prep,
    _recipe,
    _weights_given,
)
from pvt.engine.presets import list_presets
from pvt.tasks import get_task, task_names
from pvt.utils.files import atomic_write


def _cmd_train(args: argparse.Namespace) -> int:
    from pvt.engine import Trainer
    from pvt.engine.plot import plot_run
    from pvt.engine.state import latest_checkpoint

    run_dir = Path(args.output)
    if not args.resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue, or another --output")
    task, recipe = _recipe(args, args.task, None if args.preset else get_task(args.task).default_preset)
    metrics = Trainer(task, recipe, run_dir, resume=args.resume).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        png = plot_run(run_dir)
        shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in task.headline if k in metrics)
        print(f"done: {shown}; weights {run_dir / 'model.safetensors'}; curves {png}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pvt.engine import run_evaluation

    model = None
    if args.runtime == "onnxruntime":  # an exported file (pvt export) instead of weights
        from pvt.cli.deploy import onnx_predict_setup

        _no_precision_for_onnx(args)
        task, recipe, model, _ = onnx_predict_setup(args)
        prepare = None
    else:
        task, recipe = _recipe(args, args.task, None)
        _weights_given(recipe)
        prepare = _precision_prep(args, task, recipe)
    metrics = run_evaluation(task, recipe, prepare, model)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    if args.out:
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pvt.engine.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a task (torchrun-aware)")
    _add_recipe_args(p)
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--checkpoint", help="start from these weights (sets model.checkpoint; fine-tuning)")
    _add_allow_nonfinite(p)
    _add_pretrained_arg(
        p, "start from published ImageNet weights (classification: model.pretrained; dense tasks: the backbone's)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.set_defaults(func=_cmd_train)


def add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate weights on a task's evaluation split")
    _add_recipe_args(p)
    p.add_argument("--checkpoint", help="weights (a run's model.safetensors or any layout)")
    _add_allow_nonfinite(p)
    _add_pretrained_arg(p, "evaluate published weights (sets model.pretrained; their eval transform)")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    _add_runtime_args(p)
    _add_precision_args(p)
    p.set_defaults(func=_cmd_eval)


def add_presets(sub: Any) -> None:
    p = sub.add_parser("presets", help="list a task's shipped presets")
    p.add_argument("task", choices=task_names())
    p.set_defaults(func=lambda a: print("\n".join(list_presets(a.task))) or 0)


def add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw a run's loss / lr / metric curves to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)
