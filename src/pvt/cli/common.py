"""What the ``pvt`` commands share: the recipe from their flags, and the model readied for inference."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pvt.engine.runs import artifacts_of
from pvt.tasks import task_names


def _recipe(args: argparse.Namespace, task_name: str, default_preset: str | None) -> Any:
    """The task and the recipe the command's flags ask for (``pvt.engine.recipes.resolve_recipe``)."""
    from pvt.engine.recipes import resolve_recipe
    from pvt.tasks import get_task

    task = get_task(task_name)
    recipe = resolve_recipe(
        task,
        training=args.command == "train",
        preset=args.preset,
        default_preset=default_preset,
        checkpoint=getattr(args, "checkpoint", None),
        pretrained=getattr(args, "pretrained", None),
        data=getattr(args, "data", None),
        model=getattr(args, "model", None),
        allow_nonfinite=getattr(args, "allow_nonfinite", False),
        overrides=args.set or [],
    )
    return task, recipe


def _weights_given(recipe: Any) -> None:
    if recipe.model.checkpoint is None and not recipe.model.pretrained:
        raise ValueError("no weights: pass --checkpoint FILE or --pretrained [TAG] (published weights: pvt weights)")


def _precision_prep(args: argparse.Namespace, task: Any, recipe: Any) -> Any:
    """``--precision`` / ``--compile``: a function that readies the built model (None: neither given,
    so the recipe's own autocast applies). int8 calibrates on the task's training split."""
    if args.precision is None and not args.compile:
        return None

    def prepare(model: Any, device: Any) -> Any:
        from pvt.runtime.precision import calibration_inputs, optimize_for_inference, resolve_precision

        chosen = resolve_precision(args.precision or "fp32", device)
        calibration = None
        if chosen == "int8":
            train_ds, _ = task.build_datasets(recipe, train=True)
            calibration = calibration_inputs(train_ds, task.collate)
            calibration = [_to_device(x, device) for x in calibration]
        model = optimize_for_inference(model, chosen, compile=args.compile, calibration=calibration, device=device)
        print(f"precision: {chosen}{' (auto)' if args.precision == 'auto' else ''}"
              f"{', compiled' if args.compile or chosen == 'int8' else ''}", file=sys.stderr)  # fmt: skip
        return model

    return prepare


def _inference_model(args: argparse.Namespace, task: Any, recipe: Any) -> Any:
    """The task's model in eval mode, readied for ``--precision`` / ``--compile`` when given."""
    model = task.build_model(recipe).eval()
    prepare = _precision_prep(args, task, recipe)
    return model if prepare is None else prepare(model, next(model.parameters()).device)


def _no_precision_for_onnx(args: argparse.Namespace) -> None:
    if args.precision is not None or args.compile:
        raise ValueError(
            "--precision / --compile are for the PyTorch runtime; an exported file runs as it was exported"
        )


def _to_device(x: Any, device: Any) -> Any:
    return [t.to(device) for t in x] if isinstance(x, list) else x.to(device)


def _artifacts(args: argparse.Namespace) -> dict[str, Any]:
    """The run's ``task.json`` beside ``--checkpoint`` (class names, ...), or ``{}``."""
    return artifacts_of(getattr(args, "checkpoint", None))


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=("pytorch", "onnxruntime"),
        default="pytorch",
        help="onnxruntime: run the .onnx file given as --model (written by pvt export; its classes and "
        "preprocessing come from the file)",
    )


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=task_names(), help="the task")
    p.add_argument("--preset", help="a shipped preset name (see pvt presets TASK) or a recipe YAML path")
    p.add_argument("--data", help="dataset root (sets data.root)")
    p.add_argument("--model", help="model name (sets model.name); with --runtime onnxruntime the .onnx file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, repeatable")


def _add_pretrained_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument(
        "--pretrained", nargs="?", const=True, type=_tag, metavar="TAG", help=f"{text}; TAG: see pvt weights"
    )


def _add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="load weights even if they hold NaN or Inf (refused by default; sets model.allow_nonfinite)",
    )


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8", "auto"),
        help="inference arithmetic (default: the recipe's train.amp); bf16 needs avx512_bf16 / amx_bf16 or a "
        "GPU; int8 calibrates on the training split and compiles; auto: bf16 where the hardware has it, else fp32",
    )
    p.add_argument("--compile", action="store_true", help="run the model through torch.compile (weights frozen)")


def _tag(value: str) -> bool | str:
    return True if value.lower() in ("true", "default") else value
