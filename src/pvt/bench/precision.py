"""The ``precision`` and ``accuracy`` suites: fp32 / bf16 / int8 speed against the peers' fp32, and
the accuracy each precision keeps on the embedded presets' trained models.

Speed: pvt_v2_b2 (against timm's fp32 eager, the reference of the speed goals) and PVT-Small
(against HF transformers' fp32 eager) at batch 1 and 16, every precision this CPU runs natively,
eager and compiled; each row's arithmetic rate is set against the GEMM peak of its own precision;
plus our fp32 path without its fused kernels or packed weights (the ``unfused`` / ``unpacked`` rows).
Accuracy: the digits, shapes-retinanet, shapes-mask-rcnn and shapes-semantic-fpn presets, trained
once into ``$PVT_CACHE/precision-models`` when missing (the full preset; ``--quick``: digits for a
few iterations), evaluated at each precision: top-1 and its agreement with fp32, box / mask AP, mIoU.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvt.bench.harness import Row, Settings, alternate, model_gmacs, suite
from pvt.bench.peers import hf_twins, timm_twins
from pvt.layers import fused
from pvt.runtime.precision import cpu_info, optimize_for_inference, resolve_precision

PRESETS = (
    ("classification", "digits"),
    ("detection", "shapes-retinanet"),
    ("detection", "shapes-mask-rcnn"),
    ("segmentation", "shapes-semantic-fpn"),
)


def native_precisions(requested: tuple[str, ...]) -> list[str]:
    """``requested`` less what this CPU cannot run natively (bf16 without bf16 units)."""
    c = cpu_info()
    return [p for p in requested if p != "bf16" or c.bf16]


def _timed(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    return run


def _switched(run: Callable[[], Any], switch: Callable[[bool], bool]) -> Callable[[], Any]:
    """``run`` with a process-wide fused-path setting off for the call."""

    def off() -> Any:
        previous = switch(False)
        try:
            return run()
        finally:
            switch(previous)

    return off


def _unpacked(enabled: bool) -> bool:
    return fused.set_packing(enabled, release_packed=False)


def speed(s: Settings) -> None:
    """pvt_v2_b2 vs timm and PVT-Small vs HF transformers, at every precision, batch 1 and 16."""
    size = 64 if s.quick else 224
    precisions = native_precisions(s.precisions)
    for name, peer_name, twins in (("pvt_v2_b0" if s.quick else "pvt_v2_b2", "timm", timm_twins),
                                   ("pvt_tiny" if s.quick else "pvt_small", "HF transformers", hf_twins)):  # fmt: skip
        ours, peer = twins(name)
        side = 224 if peer_name.startswith("HF") else size  # HF's v1 resizes its position tables only to 224
        gm = model_gmacs(ours, (3, side, side))
        for batch in (1, 4) if s.quick else (1, 16):
            x = torch.randn(batch, 3, side, side)
            fns: dict[str, Callable[[], Any]] = {f"{peer_name} fp32 eager": _timed(peer, x)}
            if "bf16" in precisions and peer_name == "timm":
                fns[f"{peer_name} bf16 autocast"] = _timed(peer, x, autocast=True)
            for p in precisions:
                # int8 runs compiled only (its eager graph is the reference quantised maths, slow);
                # fp32 / bf16 compiled against timm only: each compile takes minutes on 2 cores.
                compiled = ["compile"] if s.compile and (p == "int8" or peer_name == "timm") else []
                modes = ([] if p == "int8" else ["eager"]) + compiled
                for mode in modes:
                    calibration = [torch.randn(batch, 3, side, side) for _ in range(2)] if p == "int8" else None
                    model = optimize_for_inference(
                        copy.deepcopy(ours), p, compile=mode == "compile", calibration=calibration
                    )
                    fns[f"pvt-vision {p} {mode}"] = _timed(model, x)
            if batch == 1 and peer_name == "timm":  # what the fused kernels and the packed weights are worth
                fns["pvt-vision fp32 eager-unfused"] = _switched(fns["pvt-vision fp32 eager"], fused.set_enabled)
                fns["pvt-vision fp32 eager-unpacked"] = _switched(fns["pvt-vision fp32 eager"], _unpacked)
            repeats = 2 * s.repeats if batch == 1 else s.repeats
            times = alternate(fns, repeats, warmup=2)  # compiled contenders compile in the warm-up
            for label, t in times.items():
                p = label.rsplit(" ", 2)[1]
                flops = None if gm is None else gm * batch
                s.rows.append(
                    Row(
                        "precision", f"{name} {side}px batch {batch}", label, 1e3 * t, repeats, gmacs=flops, precision=p
                    )
                )


def preset_weights(task_name: str, preset: str, quick: bool) -> Path:
    """The preset's trained ``model.safetensors`` in ``$PVT_CACHE/precision-models`` (trained now
    when missing; ``quick``: a few iterations into a separate folder)."""
    from pvt.engine import Trainer, load_recipe
    from pvt.engine.presets import load_preset
    from pvt.tasks import get_task
    from pvt.utils.cache import cache_dir

    run = cache_dir() / "precision-models" / (f"{preset}-quick" if quick else preset)
    weights = run / "model.safetensors"
    if weights.is_file():
        return weights
    task = get_task(task_name)
    sets = ["train.progress=false", *(["schedule.iterations=30", "schedule.warmup_iters=2"] if quick else [])]
    recipe = load_recipe(task_name, task.data_config, load_preset(task_name, preset), sets, model_cls=task.model_config)
    Trainer(task, recipe, run).fit()
    return weights


def accuracy(s: Settings) -> None:
    """Each preset's trained model evaluated at each precision, in this process."""
    from pvt.engine import load_recipe, run_evaluation
    from pvt.engine.presets import load_preset
    from pvt.runtime.precision import calibration_inputs
    from pvt.tasks import get_task

    presets = [(t, p) for t, p in PRESETS if p in s.presets] if s.presets else PRESETS[:1] if s.quick else PRESETS
    for task_name, preset in presets:
        weights = preset_weights(task_name, preset, s.quick)
        task = get_task(task_name)
        sets = [f"model.checkpoint={weights}", "model.pretrained=false", "train.progress=false"]
        recipe = load_recipe(
            task_name, task.data_config, load_preset(task_name, preset), sets, model_cls=task.model_config
        )
        precisions = [p for p in native_precisions(s.precisions) if p != "int8" or s.compile]  # int8 compiles
        calibration = None
        if "int8" in precisions:  # only int8 reads the training split
            train_ds, _ = task.build_datasets(recipe, train=True)
            calibration = calibration_inputs(train_ds, task.collate)
        reference: torch.Tensor | None = None
        for p in precisions:

            def prepare(
                model: nn.Module, device: torch.device, p: str = p, c: list[Any] | None = calibration
            ) -> nn.Module:
                return optimize_for_inference(model, resolve_precision(p), calibration=c)

            start = time.perf_counter()
            if task_name == "classification":
                metrics, logits = _classify(task, recipe, prepare)
                reference = logits if reference is None else reference
                metrics["agreement"] = 100 * float((logits.argmax(1) == reference.argmax(1)).float().mean())
            else:
                metrics = run_evaluation(task, recipe, prepare)
            seconds = time.perf_counter() - start
            shown = {k: metrics[k] for k in (*task.headline, "agreement") if k in metrics}
            s.rows.append(Row("accuracy", preset, f"pvt-vision {p}", 1e3 * seconds, 1, precision=p,
                              metrics=shown))  # fmt: skip


def _classify(
    task: Any, recipe: Any, prepare: Callable[[nn.Module, torch.device], nn.Module]
) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1 / top-5 and the logits of the whole evaluation split (for the agreement with fp32)."""
    _, val = task.build_datasets(recipe, train=False)
    loader = torch.utils.data.DataLoader(val, batch_size=recipe.data.eval_batch_size or 256)
    model = prepare(task.build_model(recipe).eval(), torch.device("cpu"))
    logits, labels = [], []
    with torch.inference_mode():
        for images, targets in loader:
            logits.append(model(images).float())
            labels.append(targets)
    out, y = torch.cat(logits), torch.cat(labels)
    top5 = out.topk(min(5, out.shape[1]), dim=1).indices.eq(y[:, None])
    return {"top1": 100 * float(top5[:, 0].float().mean()), "top5": 100 * float(top5.any(1).float().mean())}, out


def precision_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    """Speed, with each precision's % of its own GEMM peak."""
    out = ["Speed (median ms); `x peer` is the peer's fp32 eager time over the row's, `x our fp32` our fp32 "
           "eager time over the row's; % of peak is against the GEMM peak of the row's own precision:", "",
           "| setting | contender | ms | x peer fp32 eager | x our fp32 eager | GFLOP/s | % of peak |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        same = [o for o in rows if o.setting == r.setting]
        # None for rows of an older naming kept by --update: their columns stay empty.
        peers = [o for o in same if not o.contender.startswith("pvt-vision") and o.contender.endswith("fp32 eager")]
        peer = peers[0] if peers else None
        ours = next((o for o in same if o.contender == "pvt-vision fp32 eager"), None)
        gf = r.gflops
        peak = peaks.get(r.get("precision", "fp32"), float("nan"))
        rate = "|  |  |" if gf is None else f"| {gf:.1f} | {100 * gf / peak:.0f}% |"
        mine = "" if ours is None else f"{ours.ms / r.ms:.2f}x"
        over_peer = "" if peer is None else f"{peer.ms / r.ms:.2f}x"
        out.append(f"| {r.setting} | {r.contender} | {r.ms:.1f} | {over_peer} | {mine} {rate}")
    return [*out, ""]


def accuracy_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    """The presets' metrics at each precision."""
    out = ["Accuracy of the embedded presets' trained models (evaluation split; int8 calibrated on 32 "
           "training images; seconds include int8's quantisation and compilation):", "",
           "| preset | precision | metrics | seconds |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in r.get("metrics", {}).items())
        out.append(f"| {r.setting} | {r.get('precision', 'fp32')} | {shown} | {r.ms / 1e3:.0f} |")
    return [*out, ""]


# The suites: registered here, after their tables.
suite("precision", table=precision_table, needs=("peers", "precision"))(speed)
suite("accuracy", table=accuracy_table, needs=("train", "detection", "precision"))(accuracy)

__all__ = ["PRESETS", "accuracy", "accuracy_table", "native_precisions", "precision_table", "preset_weights", "speed"]
