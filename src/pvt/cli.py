"""The ``pvt`` command line: models, flops, convert, and train / eval / predict / plot for every task."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pvt.checkpoint import CheckpointError, infer_arch, load_checkpoint, read_state_dict, save_safetensors
from pvt.checkpoint.loader import check_finite
from pvt.complexity import complexity
from pvt.engine.presets import list_presets
from pvt.engine.trainer import LoaderWorkerDied, NonFiniteLoss
from pvt.io import atomic_write
from pvt.models import create_model, list_models
from pvt.runtime import keep_freed_memory
from pvt.tasks import TASKS
from pvt.zoo import zoo_table


def _cmd_models(args: argparse.Namespace) -> int:
    print(zoo_table(args.pattern))
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    h, w = args.size
    model = create_model(args.name, num_classes=args.num_classes, features_only=args.features_only)
    print(f"{args.name}: {complexity(model, (3, h, w))}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pvt.tasks.published import convert_whole_model, whole_model_task

    if whole_model_task(args.src) is not None:  # a whole detector / segmenter, with its recipe
        if args.arch:
            raise ValueError(f"{args.src}: --arch is for backbones; a whole model names its own backbone")
        print(convert_whole_model(args.src, args.dst, allow_nonfinite=args.allow_nonfinite))
        return 0
    src = read_state_dict(args.src)
    sd = src.state_dict
    arch = args.arch or infer_arch(sd)
    if arch is None:
        raise CheckpointError(
            f"{args.src}: could not tell which model these weights belong to; pass --arch "
            f"(one of {', '.join(list_models())})"
        )
    # Build the matching model and load strictly, so the written file is known to load.
    head = sd.get("head.weight")
    kwargs: dict[str, Any] = {}
    if "pos_embed1" in sd:  # v1: keep the checkpoint's own training resolution
        kwargs["img_size"] = 4 * round(sd["pos_embed1"].shape[1] ** 0.5)
    model = create_model(
        arch,
        num_classes=0 if head is None else head.shape[0],
        features_only=head is None and "cls_token" not in sd,
        **kwargs,
    )
    if not args.allow_nonfinite:
        check_finite(sd, args.src)  # here, so that the message names the file
    report = load_checkpoint(model, sd, strict=True, allow_nonfinite=True)
    report.source, report.layout = args.src, src.layout
    save_safetensors(model.state_dict(), args.dst, arch=arch)
    print(report)
    print(f"wrote {args.dst} ({arch}, pvt-vision safetensors)")
    return 0


def _recipe(args: argparse.Namespace, task_name: str, default_preset: str | None) -> Any:
    """Preset (or the run's own config.yaml next to --checkpoint) <- shorthand flags <- --set."""
    from pvt.engine import load_recipe
    from pvt.engine.presets import load_preset
    from pvt.tasks import get_task
    from pvt.tasks.published import HUB_TASK, published_recipe, recipe_of

    task = get_task(task_name)
    preset_name = args.preset
    ckpt = getattr(args, "checkpoint", None)
    pretrained = getattr(args, "pretrained", None)
    if ckpt and pretrained is not None:
        raise ValueError("pass either --checkpoint FILE or --pretrained [TAG], not both")
    if preset_name is None and ckpt and (Path(ckpt).parent / "config.yaml").is_file():
        preset_name = str(Path(ckpt).parent / "config.yaml")
    chosen = preset_name or default_preset
    preset = load_preset(task_name, chosen) if chosen else {}
    if preset_name is None and task_name in HUB_TASK:
        # A converted whole model carries its recipe; a published one gets the papers' recipe.
        if ckpt:
            preset = recipe_of(ckpt) or preset
        elif pretrained is not None and args.command != "train":
            model = getattr(args, "model", None) or "pvt_small"
            preset = published_recipe(task_name, model, pretrained, getattr(args, "set", None) or [])
    overrides = list(args.set or [])
    if getattr(args, "data", None):
        overrides.append(f"data.root={args.data}")
    if getattr(args, "model", None):
        overrides.append(f"model.name={args.model}")
    if getattr(args, "allow_nonfinite", False):
        overrides.append("model.allow_nonfinite=true")
    if ckpt:
        overrides.append(f"model.checkpoint={ckpt}")
        # A run's config.yaml may say it started from published weights; these weights replace them.
        overrides.append("model.pretrained=false")
    if pretrained is not None:
        # Training a detector / segmenter starts from the published ImageNet backbone; evaluating
        # or predicting means the published whole model.
        dense_start = args.command == "train" and task_name in HUB_TASK
        key = "model.backbone_pretrained" if dense_start else "model.pretrained"
        overrides.append(f"{key}={'true' if pretrained is True else pretrained}")
    return task, load_recipe(task_name, task.data_config, preset, overrides, model_cls=task.model_config)


def _cmd_train(args: argparse.Namespace) -> int:
    from pvt.engine import Trainer
    from pvt.engine.plot import plot_run
    from pvt.engine.state import latest_checkpoint

    run_dir = Path(args.output)
    if not args.resume and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue, or another --output")
    task, recipe = _recipe(args, args.task, None if args.preset else "digits")
    metrics = Trainer(task, recipe, run_dir, resume=args.resume).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        png = plot_run(run_dir)
        shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in task.headline if k in metrics)
        print(f"done: {shown}; weights {run_dir / 'model.safetensors'}; curves {png}")
    return 0


def _weights_given(recipe: Any) -> None:
    if recipe.model.checkpoint is None and not recipe.model.pretrained:
        raise ValueError("no weights: pass --checkpoint FILE or --pretrained [TAG] (published weights: pvt weights)")


def _precision_prep(args: argparse.Namespace, task: Any, recipe: Any) -> Any:
    """``--precision`` / ``--compile``: a function that readies the built model (None: neither given,
    so the recipe's own autocast applies). int8 calibrates on the task's training split."""
    if args.precision is None and not args.compile:
        return None

    def prepare(model: Any, device: Any) -> Any:
        from pvt.precision import calibration_inputs, optimize_for_inference, resolve_precision

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


def _cmd_eval(args: argparse.Namespace) -> int:
    from pvt.engine import run_evaluation

    model = None
    if args.runtime == "onnxruntime":  # an exported file (pvt export) instead of weights
        from pvt.deploy.command import onnx_predict_setup

        _no_precision_for_onnx(args)
        task, recipe, model, _ = onnx_predict_setup(args, _recipe)
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


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.runtime == "onnxruntime":  # an exported file (pvt export) instead of weights
        from pvt.deploy.command import onnx_predict_setup

        _no_precision_for_onnx(args)
        task, recipe, model, artifacts = onnx_predict_setup(args, _recipe)
    else:
        task, recipe = _recipe(args, args.task, None)
        _weights_given(recipe)
        model = _inference_model(args, task, recipe)
        meta = Path(args.checkpoint).parent / "task.json" if args.checkpoint else None
        artifacts = json.loads(meta.read_text()) if meta is not None and meta.is_file() else {}
    for r in task.predict(model, recipe, args.inputs, artifacts, args.out):
        print(json.dumps(r))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """The model of any task behind an HTTP API and a web page (pvt.serve)."""
    from pvt.engine.config import read_yaml
    from pvt.tasks.published import whole_model_task

    try:
        from pvt.serve import ServeOptions, serve
    except ImportError as e:
        raise ValueError(f"pvt serve needs the serve extra: pip install 'pvt-vision[serve]' ({e})") from e

    ckpt = Path(args.checkpoint)
    run_config = ckpt.parent / "config.yaml"
    # The task, as the weights' run (or a converted file's header) says; a plain model file classifies.
    task_name = args.task or (read_yaml(run_config).get("task") if run_config.is_file() else None)
    task, recipe = _recipe(args, task_name or whole_model_task(ckpt) or "classification", None)
    # Compiled precisions compile once per batch shape, on its first request.
    model = _inference_model(args, task, recipe)
    meta = ckpt.parent / "task.json"
    artifacts = json.loads(meta.read_text()) if meta.is_file() else {}
    opts = ServeOptions(args.host, args.port, args.max_batch, args.batch_wait_ms, args.max_upload_mb)
    serve(task.name, recipe, model, task.predictor(model, recipe, artifacts), opts)
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    from pvt.hub import is_cached, list_sources

    rows = [("name", "task", "arch", "host", "metric", "cached")]
    for s in list_sources(args.pattern, task=args.task):
        rows.append((s.name, s.task, s.arch, s.host, s.metric_text(), "yes" if is_cached(s) else "no"))
    if len(rows) == 1:
        raise ValueError(f"no published weights match {args.pattern!r}; see pvt weights")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    """Fetch each NAME[:TAG]; Google-Drive rows print where to get them; failures are summed up."""
    from pvt.hub import ManualDownloadRequired, WeightsUnavailable, fetch_to, get_source, resolve

    failed = []
    for item in args.names:
        source = get_source(item, task=None)
        try:
            path = fetch_to(source, args.to) if args.to else resolve(source)
        except ManualDownloadRequired as e:
            print(f"manual: {e}")
            continue
        except WeightsUnavailable as e:
            print(f"pvt download: error: {e}", file=sys.stderr)
            failed.append(source.name)
            continue
        print(f"{source.name}: {path}")
    if failed:
        raise CheckpointError(f"could not fetch {len(failed)} of {len(args.names)}: {', '.join(failed)}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pvt.engine.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pvt.benchmark import PRECISIONS, SUITES, Settings, run

    suites = tuple(args.suites.split(",")) if args.suites else SUITES
    precisions = tuple(args.precision.split(",")) if args.precision else PRECISIONS
    presets = tuple(args.presets.split(",")) if args.presets else ()
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        raise ValueError(f"--precision: unknown {', '.join(unknown)}; choose from {','.join(PRECISIONS)}")
    settings = Settings(threads=args.threads, repeats=args.repeats, quick=args.quick, suites=suites,
                        compile=not args.no_compile, update=args.update, precisions=precisions,
                        presets=presets)  # fmt: skip
    print(run(settings, args.out))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pvt.deploy.command import run_export

    return run_export(args, _recipe)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=("pytorch", "onnxruntime"),
        default="pytorch",
        help="onnxruntime: run the .onnx file given as --model (written by pvt export; its classes and "
        "preprocessing come from the file)",
    )


def _add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a model to ONNX or a torch.export program (.pt2), with its metadata")
    p.add_argument("source", metavar="CKPT_OR_NAME", help="a run's model.safetensors, a weights file or a model name")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2), written atomically")
    kinds = ("classification", "features", "detection", "segmentation")
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


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS, help="the task")
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


def _untangle_pretrained(argv: list[str]) -> list[str]:
    """``--pretrained photo.jpg``: argparse would take the image for the optional TAG. Tags hold
    no "." or "/" and name no existing file or folder, so such a value stays an input and the
    default weights are meant."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        value = out[i + 1]
        if arg == "--pretrained" and ("." in value or "/" in value or Path(value).exists()):
            out[i] = "--pretrained=default"
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvt", description="Pyramid Vision Transformer toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="print the model zoo table (measured params and GMACs)")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'pvt_v2_*'")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("flops", help="params, papers' GMACs and full GFLOPs of one model")
    p.add_argument("name", choices=list_models(), metavar="NAME")
    p.add_argument("--size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--features-only", action="store_true", help="count the backbone without a head")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("convert", help="convert any supported checkpoint to pvt-vision safetensors")
    p.add_argument(
        "src",
        help="a backbone (official / timm / HF / mmdet / pvt-vision) or a whole detector / "
        "segmenter (mmdetection, the authors' mmdet / mmseg releases, pvt-vision)",
    )
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--arch", choices=list_models(), metavar="NAME", help="default: inferred")
    _add_allow_nonfinite(p)
    p.set_defaults(func=_cmd_convert)

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

    p = sub.add_parser("eval", help="evaluate weights on a task's evaluation split")
    _add_recipe_args(p)
    p.add_argument("--checkpoint", help="weights (a run's model.safetensors or any layout)")
    _add_allow_nonfinite(p)
    _add_pretrained_arg(p, "evaluate published weights (sets model.pretrained; their eval transform)")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    _add_runtime_args(p)
    _add_precision_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="predict on image files or folders")
    _add_recipe_args(p)
    p.add_argument("--checkpoint", help="weights; a run's config.yaml beside them is used")
    _add_allow_nonfinite(p)
    _add_pretrained_arg(p, "published weights (sets model.pretrained; their transform and class names)")
    p.add_argument("--out", help="folder for the task's output files")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    _add_runtime_args(p)
    _add_precision_args(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("serve", help="serve a model over HTTP: a JSON API and a web page (needs [serve])")
    p.add_argument("--checkpoint", required=True, help="weights; a run's config.yaml beside them is used")
    p.add_argument("--task", choices=TASKS, help="default: the run's config.yaml, or the file's own")
    p.add_argument("--preset", help="a shipped preset name or a recipe YAML path (default: the run's config.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, repeatable")
    _add_allow_nonfinite(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the chosen one is printed)")
    p.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for batch-mates")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused with 413")
    _add_precision_args(p)
    p.set_defaults(func=_cmd_serve)

    _add_export_parser(sub)

    p = sub.add_parser("weights", help="list the published weights: source, metric, whether cached")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern on NAME or NAME:TAG, e.g. 'pvt_v2_*'")
    p.add_argument("--task", choices=("imagenet", "coco", "ade20k"), help="only this task's weights")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("download", help="fetch published weights into the cache (or --to DIR) ahead of use")
    p.add_argument("names", nargs="+", metavar="NAME[:TAG]", help="e.g. pvt_v2_b2 (default tag) or pvt_v2_b2:timm")
    p.add_argument("--to", metavar="DIR", help="also copy them here (copy DIR to $PVT_CACHE/weights offline)")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("presets", help="list a task's shipped presets")
    p.add_argument("task", choices=TASKS)
    p.set_defaults(func=lambda a: print("\n".join(list_presets(a.task))) or 0)

    p = sub.add_parser("bench", help="time pvt-vision against timm, HF transformers and CNNs (needs [peers])")
    p.add_argument("--out", default="bench-results", help="folder for RESULTS.md, results.json and PNGs")
    p.add_argument(
        "--suites",
        help="comma-separated subset of classify,train,dense,scaling,precision,accuracy; or memory (a leak check), "
        "serve (pvt serve under load, batching vs --max-batch 1)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=7, help="alternating rounds per comparison (median)")
    p.add_argument("--quick", action="store_true", help="tiny models and inputs: check the machinery only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    p.add_argument("--update", action="store_true", help="rerun --suites only, keep the rest of --out's results")
    p.add_argument(
        "--precision",
        help="comma-separated precisions the precision and accuracy suites measure (default fp32,bf16,int8; "
        "bf16 only where the CPU has it)",
    )
    p.add_argument(
        "--presets",
        help="the accuracy suite's presets (default digits,shapes-retinanet,shapes-mask-rcnn,shapes-semantic-fpn; "
        "each trained once into $PVT_CACHE/precision-models when missing)",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("plot", help="draw a run's loss / lr / metric curves to PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)
    return parser


_INFERENCE_COMMANDS = ("eval", "predict", "bench", "serve", "export")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_untangle_pretrained(list(sys.argv[1:] if argv is None else argv)))
    keep_freed_memory()  # our own process: activations stop being page-faulted in per forward
    if args.command in _INFERENCE_COMMANDS:
        # Denormal numbers in activations can make fp32 inference many times slower (measured:
        # 20x on one random initialisation); flushing them to zero costs nothing visible.
        torch.set_flush_denormal(True)
    try:
        return int(args.func(args))
    except (CheckpointError, ValueError, OSError, NonFiniteLoss, LoaderWorkerDied) as e:
        print(f"pvt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
