"""``pvt export`` and the ``--runtime onnxruntime`` side of ``pvt predict`` / ``pvt eval``.

The command line lives in ``pvt.cli``; these functions get its parsed arguments and its recipe
builder, so that an exported model is built from exactly the recipe ``pvt eval`` would use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pvt.deploy.export import ExportError, export, model_kind, read_metadata
from pvt.deploy.metadata import describe, recipe_overrides

RecipeFn = Callable[[argparse.Namespace, str, str | None], Any]  # pvt.cli._recipe

DEFAULT_SIZE = {"classification": None, "features": (224, 224), "detection": (800, 800), "segmentation": (512, 512)}


def _task_json(checkpoint: str | None) -> dict[str, Any]:
    meta = Path(checkpoint).parent / "task.json" if checkpoint else None
    return dict(json.loads(meta.read_text())) if meta is not None and meta.is_file() else {}


def _bare_backbone(path: str, features_only: bool) -> nn.Module:
    """A classifier / backbone from a weights file with no run recipe beside it: the architecture
    and class count are read from the file (as ``pvt convert`` does)."""
    from pvt.checkpoint import infer_arch, read_state_dict
    from pvt.models import create_model

    sd = read_state_dict(path).state_dict
    arch = infer_arch(sd)
    if arch is None:
        raise ExportError(
            f"{path}: could not tell which PVT these weights belong to; convert it with pvt convert --arch"
        )
    head = sd.get("head.weight")
    kwargs: dict[str, Any] = {}
    if "pos_embed1" in sd:  # v1: the checkpoint's own training resolution
        kwargs["img_size"] = 4 * round(sd["pos_embed1"].shape[1] ** 0.5)
    if not features_only and head is None:
        raise ExportError(f"{path}: a backbone without a classifier head; export it with --task features")
    n = 0 if head is None else int(head.shape[0])
    return create_model(arch, num_classes=n, features_only=features_only, checkpoint=path, **kwargs)


def build_for_export(args: argparse.Namespace, recipe_fn: RecipeFn) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, its recipe or None, the run's task.json) for ``pvt export``."""
    from pvt.models import create_model, list_models

    kind = args.task
    source = args.source
    is_file = Path(source).is_file()
    if not is_file and source not in list_models():
        raise ExportError(
            f"{source}: neither a weights file nor a model name (one of {', '.join(list_models())}); "
            "for a detector or segmenter pass the run's model.safetensors or a backbone name with --task"
        )
    ckpt = source if is_file else None
    has_recipe = ckpt is not None and (Path(ckpt).parent / "config.yaml").is_file()
    if kind in ("classification", "features") and ckpt is not None and not has_recipe and args.preset is None:
        return _bare_backbone(ckpt, kind == "features").eval(), None, {}
    if kind == "features":
        name = source if not is_file else None
        if name is None:  # a run's classifier: its backbone, from its recipe
            _, recipe = recipe_fn(_recipe_args(args, ckpt), "classification", None)
            name = recipe.model.name
        model = create_model(name, features_only=True, pretrained=args.pretrained or False, checkpoint=ckpt)
        return model.eval(), None, {}
    task, recipe = recipe_fn(_recipe_args(args, ckpt), kind, None)
    model = task.build_model(recipe).eval()
    return model, recipe, _task_json(ckpt)


def _recipe_args(args: argparse.Namespace, ckpt: str | None) -> argparse.Namespace:
    """The attributes ``pvt.cli._recipe`` reads, from ``pvt export``'s arguments."""
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


def _classes(kind: str, model: nn.Module, recipe: Any, artifacts: dict[str, Any]) -> list[str] | None:
    """The class names ``pvt predict`` would print for this model."""
    names = artifacts.get("classes") or getattr(model, "class_names", None)
    if names:
        return list(names)
    if recipe is None:
        return None
    if kind == "classification":
        from pvt.tasks.classification.task import imagenet_source

        if imagenet_source(recipe) is not None:
            from pvt.hub import imagenet_classes

            return list(imagenet_classes())
    elif kind == "detection":
        if recipe.model.num_classes == 80 and recipe.data.dataset == "coco":
            from pvt.tasks.detection.coco import COCO_CLASSES

            return list(COCO_CLASSES)
    elif kind == "segmentation":
        from pvt.tasks.segmentation.data import class_names

        return class_names(recipe.data, recipe.model.num_classes)
    return None


def export_size(args: argparse.Namespace, kind: str, recipe: Any) -> tuple[int, int]:
    if args.size:
        return int(args.size[0]), int(args.size[1])
    if kind == "detection" and recipe is not None:  # the size the detector resizes to (square: see export)
        side = int(recipe.model.min_size[-1])
        return side, side
    default = DEFAULT_SIZE[kind]
    if default is not None:
        return default
    n = recipe.data.input_size if recipe is not None else 224
    return int(n), int(n)


def run_export(args: argparse.Namespace, recipe_fn: RecipeFn) -> int:
    model, recipe, artifacts = build_for_export(args, recipe_fn)
    kind = model_kind(model)
    h, w = export_size(args, kind, recipe)
    if kind == "detection":
        if args.batch != 1:
            raise ExportError(
                "--batch applies to classifiers, backbones and segmenters: a detector's file takes one image per "
                "run (torchvision's detectors loop over a list of images in Python, so a trace fixes their number)"
            )
        example = torch.rand(3, h, w)
    else:
        example = torch.rand(args.batch, 3, h, w)
    meta = describe(
        model, kind, size=(h, w), recipe=recipe, artifacts=artifacts,
        classes=_classes(kind, model, recipe, artifacts),
    )  # fmt: skip
    out = export(model, example, args.out, format=args.format, dynamic=args.dynamic, metadata=meta)
    line = f"wrote {out} ({kind}, {meta.get('arch')}, {args.format}, {'dynamic' if args.dynamic else f'{h}x{w}'})"
    if args.check:
        line += f"; {check_export(model, out, example, kind)}"
    print(line)
    return 0


@torch.no_grad()
def check_export(model: nn.Module, path: Path, example: Tensor, kind: str) -> str:
    """Run the written file on ``example`` and compare with the model: ``max |diff| ...``."""
    if kind == "detection":
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


def onnx_predict_setup(args: argparse.Namespace, recipe_fn: RecipeFn) -> tuple[Any, Any, nn.Module, dict[str, Any]]:
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
    task, recipe = recipe_fn(recipe_args, args.task, None)
    artifacts = dict(meta.get("artifacts") or {})
    if args.task != "detection" and meta.get("classes"):  # detection reads its names and ids as stored
        artifacts["classes"] = meta["classes"]
    print(f"onnxruntime: {args.model} ({meta.get('arch')}, exported by {meta.get('exporter')})", file=sys.stderr)
    return task, recipe, model, artifacts
