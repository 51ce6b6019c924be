"""``pvt export`` and the ``--runtime onnxruntime`` side of ``pvt predict`` / ``pvt eval``.

These functions get the command's parsed arguments and build the recipe as every command does
(``pvt.cli.common._recipe``), so that an exported model is built from exactly the recipe
``pvt eval`` would use. The model's task says how it is exported (``Task.export_spec``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pvt.cli.common import (
    _add_allow_nonfinite,
    _add_pretrained_arg,
    _recipe,
)
from pvt.deploy.exporter import export, read_metadata
from pvt.deploy.metadata import describe, recipe_overrides
from pvt.deploy.spec import ExportError, export_spec
from pvt.deploy.triton import CONFIG_FILE, DEFAULT_MAX_BATCH, DEVICES, MODEL_FILE, VERSION, export_triton
from pvt.engine.runs import artifacts_of, run_config_of
from pvt.tasks import task_names


def _bare_backbone(path: str, features_only: bool) -> nn.Module:
    """A classifier / backbone from a weights file with no run recipe beside it: the architecture
    and class count are read from the file (as ``pvt convert`` does)."""
    from pvt.checkpoint import load_checkpoint, read_state_dict
    from pvt.models import model_for_weights

    sd = read_state_dict(path).state_dict
    if not features_only and sd.get("head.weight") is None:
        raise ExportError(f"{path}: a backbone without a classifier head; export it with --task features")
    model = model_for_weights(sd, path, features_only=features_only)
    model.load_report = load_checkpoint(model, path)
    return model


def _recipe_args(args: argparse.Namespace, ckpt: str | None) -> argparse.Namespace:
    """The attributes ``pvt.cli.common._recipe`` reads, from ``pvt export``'s arguments."""
    model = None if ckpt is not None else args.source
    return argparse.Namespace(
        command="export",
        preset=args.preset,
        checkpoint=ckpt,
        pretrained=args.pretrained,
        set=args.set,
        data=None,
        model=model,
        allow_nonfinite=args.allow_nonfinite,
    )


def build_for_export(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, its recipe or None, the run's task.json) for ``pvt export``."""
    from pvt.models import create_model, list_models

    source = args.source
    is_file = Path(source).is_file()
    if not is_file and source not in list_models():
        raise ExportError(
            f"{source}: neither a weights file nor a model name (one of {', '.join(list_models())}); "
            "for a detector or segmenter pass the run's model.safetensors or a backbone name with --task"
        )
    ckpt = source if is_file else None
    backbone = args.task in ("classification", "features")
    if backbone and ckpt is not None and run_config_of(ckpt) is None and args.preset is None:
        return _bare_backbone(ckpt, args.task == "features").eval(), None, {}
    if args.task == "features":  # a bare backbone: no task of its own
        name = source if not is_file else None
        if name is None:  # a run's classifier: its backbone, from its recipe
            _, recipe = _recipe(_recipe_args(args, ckpt), "classification", None)
            name = recipe.model.name
        model = create_model(name, features_only=True, pretrained=args.pretrained or False, checkpoint=ckpt)
        return model.eval(), None, {}
    task, recipe = _recipe(_recipe_args(args, ckpt), args.task, None)
    return task.build_model(recipe).eval(), recipe, artifacts_of(ckpt)


def _check_triton_options(args: argparse.Namespace) -> None:
    """The --triton-* options only mean something with --format triton: say so rather than ignore them."""
    given = [
        f"--triton-{k}"
        for k in ("name", "device", "max-batch")
        if getattr(args, f"triton_{k.replace('-', '_')}") is not None
    ]
    if given and args.format != "triton":
        raise ExportError(f"{', '.join(given)} apply to --format triton (a Triton model repository), not {args.format}")


def run_export(args: argparse.Namespace) -> int:
    _check_triton_options(args)
    model, recipe, artifacts = build_for_export(args)
    spec = export_spec(model, recipe, artifacts)
    h, w = (int(args.size[0]), int(args.size[1])) if args.size else spec.default_size
    if spec.one_image:
        if args.batch != 1:
            raise ExportError(
                f"--batch applies to models that take a batch: a {spec.kind} file takes one image per run "
                "(torchvision's detectors loop over a list of images in Python, so a trace fixes their number)"
            )
        example = torch.rand(3, h, w)
    else:
        example = torch.rand(args.batch, 3, h, w)
    meta = describe(model, size=(h, w), recipe=recipe, artifacts=artifacts, spec=spec)
    shape = "dynamic" if args.dynamic else f"{h}x{w}"
    if args.format == "triton":
        folder = export_triton(
            model,
            example,
            args.out,
            name=args.triton_name,
            device=args.triton_device or "cpu",
            max_batch_size=DEFAULT_MAX_BATCH if args.triton_max_batch is None else args.triton_max_batch,
            dynamic=args.dynamic,
            metadata=meta,
        )
        out = folder / VERSION / MODEL_FILE
        line = f"wrote {folder}/{{{CONFIG_FILE}, {VERSION}/{MODEL_FILE}}} ({spec.kind}, {meta.get('arch')}, {shape})"
    else:
        out = export(model, example, args.out, format=args.format, dynamic=args.dynamic, metadata=meta)
        line = f"wrote {out} ({spec.kind}, {meta.get('arch')}, {args.format}, {shape})"
    if args.check:
        line += f"; {check_export(model, out, example, spec.one_image)}"
    print(line)
    return 0


@torch.no_grad()
def check_export(model: nn.Module, path: Path, example: Tensor, one_image: bool) -> str:
    """Run the written file on ``example`` and compare with the model: ``max |diff| ...``."""
    if one_image:
        ref = model([example])[0]
        got = load_runtime_model(path)([example])[0]
        if ref["boxes"].shape != got["boxes"].shape:  # e.g. a near tie at the score threshold: say it, not fail
            return f"checked on the example: {len(got['boxes'])} detections, PyTorch {len(ref['boxes'])}"
        diffs = [(ref[k].float() - got[k].float()).abs().max().item() if ref[k].numel() else 0.0 for k in ref]
    else:
        ref_out = model(example)
        got_out = load_runtime_model(path)(example)
        refs = ref_out if isinstance(ref_out, list) else [ref_out]
        gots = got_out if isinstance(got_out, list) else [got_out]
        diffs = [(r - g).abs().max().item() for r, g in zip(refs, gots, strict=True)]
    return f"checked on the example: max |diff| {max(diffs, default=0.0):.2e} against PyTorch"


def load_runtime_model(path: Path) -> Any:
    """The exported file as a callable: ONNX Runtime for .onnx, ``torch.export.load`` for .pt2."""
    if path.suffix == ".pt2":
        read_metadata(path)
        return torch.export.load(path).module()
    from pvt.deploy.onnx_runtime import load_onnx

    return load_onnx(path)


def onnx_predict_setup(args: argparse.Namespace) -> tuple[Any, Any, nn.Module, dict[str, Any]]:
    """``--runtime onnxruntime``: (task, recipe, ONNX Runtime model, artifacts). ``--model`` names the
    file; the recipe takes the file's classes and preprocessing, then the command's --preset / --set."""
    from pvt.deploy.onnx_runtime import load_onnx

    if not args.model:
        raise ExportError("--runtime onnxruntime needs --model FILE.onnx (written by pvt export)")
    if getattr(args, "checkpoint", None) or getattr(args, "pretrained", None) is not None:
        raise ExportError("--runtime onnxruntime runs the --model file: drop --checkpoint / --pretrained")
    model = load_onnx(args.model, task=args.task)
    meta = model.metadata
    recipe_args = argparse.Namespace(**vars(args))
    recipe_args.model = None
    recipe_args.set = recipe_overrides(meta) + list(args.set or [])
    task, recipe = _recipe(recipe_args, args.task, None)
    artifacts = task.artifacts_from_export(meta)
    print(f"onnxruntime: {args.model} ({meta.get('arch')}, exported by {meta.get('exporter')})", file=sys.stderr)
    return task, recipe, model, artifacts


def _cmd_export(args: argparse.Namespace) -> int:
    from pvt.cli.deploy import run_export

    return run_export(args)


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX, a torch.export program (.pt2) or a Triton model repository, with its metadata",
    )
    p.add_argument("source", metavar="CKPT_OR_NAME", help="a run's model.safetensors, a weights file or a model name")
    p.add_argument(
        "--format", choices=("onnx", "pt2", "triton"), default="onnx", help="triton: ONNX in a Triton repository"
    )
    p.add_argument(
        "--out", required=True, help="output file (.onnx or .pt2), written atomically; --format triton: the repository"
    )
    p.add_argument("--triton-name", help="--format triton: the model's name and folder (default: its architecture)")
    p.add_argument("--triton-device", choices=tuple(DEVICES), help="--format triton: instance_group kind (default cpu)")
    p.add_argument(
        "--triton-max-batch",
        type=int,
        metavar="N",
        help=f"--format triton: the largest batch of a --dynamic classifier / segmenter (default {DEFAULT_MAX_BATCH})",
    )
    kinds = (*task_names(), "features")
    p.add_argument("--task", choices=kinds, default="classification", help="features: the four-map backbone")
    p.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"), help="example input size (the fixed size without --dynamic)"
    )
    p.add_argument("--dynamic", action="store_true", help="batch, height and width dynamic (detectors: height, width)")
    p.add_argument("--batch", type=int, default=1, help="example batch (the fixed batch without --dynamic)")
    p.add_argument("--preset", help="recipe preset or YAML (detector / segmenter settings)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, repeatable")
    _add_pretrained_arg(p, "published weights (sets model.pretrained)")
    _add_allow_nonfinite(p)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip running the file on the example")
    p.set_defaults(func=_cmd_export)
