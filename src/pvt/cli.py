"""The ``pvt`` command line: ``pvt models``, ``pvt flops``, ``pvt convert``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pvt.checkpoint import CheckpointError, infer_arch, load_checkpoint, read_state_dict, save_safetensors
from pvt.complexity import complexity
from pvt.models import create_model, list_models
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
    report = load_checkpoint(model, sd, strict=True)
    report.source, report.layout = args.src, src.layout
    save_safetensors(model.state_dict(), args.dst, arch=arch)
    print(report)
    print(f"wrote {args.dst} ({arch}, pvt-vision safetensors)")
    return 0


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
    p.add_argument("src", help="official / timm / HF / mmdet / mmseg / pvt-vision checkpoint")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--arch", choices=list_models(), metavar="NAME", help="default: inferred")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CheckpointError, ValueError) as e:
        print(f"pvt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
