"""``pvt bench``: the benchmark suites (``pvt.bench``)."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_bench(args: argparse.Namespace) -> int:
    from pvt.bench.harness import PRECISIONS, Settings, default_suites
    from pvt.bench.runner import run

    suites = tuple(args.suites.split(",")) if args.suites else default_suites()
    precisions = tuple(args.precision.split(",")) if args.precision else PRECISIONS
    presets = tuple(args.presets.split(",")) if args.presets else ()
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        raise ValueError(f"--precision: unknown {', '.join(unknown)}; choose from {','.join(PRECISIONS)}")
    settings = Settings(threads=args.threads, repeats=args.repeats, quick=args.quick, suites=suites,
                        compile=not args.no_compile, update=args.update, precisions=precisions,
                        presets=presets)  # fmt: skip
    print(run(settings, args.out))
    return 0


def add_bench(sub: Any) -> None:
    from pvt.bench.harness import suites as bench_suites

    p = sub.add_parser("bench", help="time pvt-vision against timm, HF transformers and CNNs (needs [peers])")
    p.add_argument("--out", default="bench-results", help="folder for RESULTS.md, results.json and PNGs")
    registered = bench_suites().values()
    p.add_argument(
        "--suites",
        help=f"comma-separated subset of {','.join(s.name for s in registered if s.default)}; or "
        + ", ".join(f"{s.name} ({s.doc})" if s.doc else s.name for s in registered if not s.default),
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
