"""``pvt models``, ``flops``, ``convert``, ``weights``, ``download``: the zoo, complexity, checkpoints
and published weights."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pvt.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_safetensors
from pvt.checkpoint.loader import check_finite
from pvt.cli.common import (
    _add_allow_nonfinite,
)
from pvt.models import create_model, list_models, model_for_weights
from pvt.models.complexity import complexity
from pvt.models.zoo import zoo_table


def _cmd_models(args: argparse.Namespace) -> int:
    print(zoo_table(args.pattern))
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    h, w = args.size
    model = create_model(args.name, num_classes=args.num_classes, features_only=args.features_only)
    print(f"{args.name}: {complexity(model, (3, h, w))}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pvt.tasks import convert_whole_model, whole_model_task

    if whole_model_task(args.src) is not None:  # a whole detector / segmenter, with its recipe
        if args.arch:
            raise ValueError(f"{args.src}: --arch is for backbones; a whole model names its own backbone")
        print(convert_whole_model(args.src, args.dst, allow_nonfinite=args.allow_nonfinite))
        return 0
    src = read_state_dict(args.src)
    sd = src.state_dict
    # Build the matching model and load strictly, so the written file is known to load.
    model = model_for_weights(sd, args.src, arch=args.arch)
    arch = model.arch
    if not args.allow_nonfinite:
        check_finite(sd, args.src)  # here, so that the message names the file
    report = load_checkpoint(model, sd, strict=True, allow_nonfinite=True)
    report.source, report.layout = args.src, src.layout
    save_safetensors(model.state_dict(), args.dst, arch=arch)
    print(report)
    print(f"wrote {args.dst} ({arch}, pvt-vision safetensors)")
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


def add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="print the model zoo table (measured params and GMACs)")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'pvt_v2_*'")
    p.set_defaults(func=_cmd_models)


def add_flops(sub: Any) -> None:
    p = sub.add_parser("flops", help="params, papers' GMACs and full GFLOPs of one model")
    p.add_argument("name", choices=list_models(), metavar="NAME")
    p.add_argument("--size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--features-only", action="store_true", help="count the backbone without a head")
    p.set_defaults(func=_cmd_flops)


def add_convert(sub: Any) -> None:
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


def add_weights(sub: Any) -> None:
    p = sub.add_parser("weights", help="list the published weights: source, metric, whether cached")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern on NAME or NAME:TAG, e.g. 'pvt_v2_*'")
    p.add_argument("--task", choices=("imagenet", "coco", "ade20k"), help="only this task's weights")
    p.set_defaults(func=_cmd_weights)


def add_download(sub: Any) -> None:
    p = sub.add_parser("download", help="fetch published weights into the cache (or --to DIR) ahead of use")
    p.add_argument("names", nargs="+", metavar="NAME[:TAG]", help="e.g. pvt_v2_b2 (default tag) or pvt_v2_b2:timm")
    p.add_argument("--to", metavar="DIR", help="also copy them here (copy DIR to $PVT_CACHE/weights offline)")
    p.set_defaults(func=_cmd_download)
