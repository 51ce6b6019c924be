"""The ``pvt`` command line, one module per command group: ``models`` (zoo, complexity, checkpoints,
published weights), ``run`` (train / eval / presets / plot of every task), ``serve``,
``predict`` (collections), ``deploy`` (export, ONNX Runtime) and ``bench``; ``common`` holds what they share."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pvt.checkpoint import CheckpointError
from pvt.cli.bench import add_bench
from pvt.cli.common import _recipe
from pvt.cli.deploy import add_export
from pvt.cli.models import add_convert, add_download, add_flops, add_models, add_weights
from pvt.cli.predict import add_predict
from pvt.cli.run import add_eval, add_plot, add_presets, add_train
from pvt.cli.serve import add_serve
from pvt.engine.trainer import LoaderWorkerDied, NonFiniteLoss
from pvt.runtime import keep_freed_memory

__all__ = ["_recipe", "build_parser", "main"]


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


class _Intermixed(argparse.ArgumentParser):
    """A command's parser where positionals may follow options (``pvt predict TASK --checkpoint W
    photos/``): plain argparse gives an optional-length positional only its first run of values."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:  # parse_known_intermixed_args calls back here, twice
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def build_parser() -> argparse.ArgumentParser:
    """The ``pvt`` command's parser: one sub-command per ``add_*`` of its command group."""
    parser = argparse.ArgumentParser(prog="pvt", description="Pyramid Vision Transformer toolkit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Intermixed)
    for add in (add_models, add_flops, add_convert, add_train, add_eval, add_predict, add_serve, add_export,
                add_weights, add_download, add_presets, add_bench, add_plot):  # fmt: skip
        add(sub)
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
