"""Side-by-side speed and memory of pvt-vision against its peers, on the same weights, in one run.

``pvt bench`` (or ``python benchmarks/run.py``) runs the suites below and writes ``RESULTS.md``
and PNG plots. Every comparison builds the contenders from the same weights (our converter
loads the peer's state dict) and checks their outputs agree before timing; contenders are timed
in alternation, round after round, and the median is reported, so a machine's drift hits all
of them alike.

Suites: ``classify`` (224x224, eval, batch 1, 16 and 32: ours vs timm ``pvt_v2_*`` and vs HF
transformers' Pvt / PvtV2, torchvision ResNet-50 as the CNN reference), ``train`` (forward,
backward and AdamW step at batch 32), ``dense`` (multi-scale features at 512x512 and 800x1333;
RetinaNet-PVT-Small vs torchvision's RetinaNet-ResNet-50 at 800x1333), ``scaling`` (latency and
peak memory from 224 to 1024 px: PVT-Small, v2-b2, v2-b2-li vs timm ViT-Small/16), ``precision``
(``pvt.bench_precision``: fp32 / bf16 / int8, eager and compiled, against timm's and HF's fp32, and
the embedded presets' accuracy at each precision; plus ours without fused kernels or packed
weights, the ``fused`` rows) and the machine's GEMM peak in each precision. The process keeps
freed memory (``pvt.runtime``) and flushes denormals, for every contender alike.

``memory`` (not run by default: a leak check, not a comparison) trains the digits preset for 200
iterations in a fresh process, as ``pvt train`` does, and checks its resident memory grows by less
than ``MEMORY_BOUND_PCT`` from the end of the first epoch to the end.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvt import runtime
from pvt.bench_precision import gemm_peaks
from pvt.complexity import complexity
from pvt.peers import check_twins, hf_twins, timm_twins
from pvt.precision import CPU_FLAGS, cpu_info

SUITES = ("classify", "train", "dense", "scaling", "precision", "accuracy")  # the default run
# By name only: pvt bench --suites memory (a leak check), serve (pvt serve under load), deploy
# (exported files in ONNX Runtime: pvt.deploy.bench).
EXTRA_SUITES = ("memory", "serve", "deploy")
PRECISIONS = ("fp32", "bf16", "int8")
MEMORY_BOUND_PCT = 5.0  # the memory suite's bound on RSS growth after the first epoch


@dataclass
class Row:
    """One contender in one setting: median milliseconds over ``repeats`` alternating rounds."""

    suite: str
    setting: str
    contender: str
    ms: float
    repeats: int
    gmacs: float | None = None  # per call, papers' convention (None where not counted)
    peak_mib: float | None = None
    note: str = ""
    rss_epoch1_mib: float | None = None  # memory suite: resident MiB after the first epoch ...
    rss_end_mib: float | None = None  # ... and at the end of training
    precision: str = "fp32"  # the arithmetic (its GEMM peak is the row's % of peak)
    metrics: dict[str, float] = field(default_factory=dict)  # precision-accuracy rows
    rps: float | None = None  # serve suite: requests per second (``ms`` is the p50 latency) ...
    p99_ms: float | None = None  # ... and the p99 latency

    @property
    def growth_pct(self) -> float | None:
        """Resident memory growth from the end of the first epoch to the end (memory suite)."""
        if self.rss_epoch1_mib is None or self.rss_end_mib is None:
            return None
        return 100 * (self.rss_end_mib / self.rss_epoch1_mib - 1)

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s (2 FLOPs per MAC)."""
        return None if self.gmacs is None else 2 * self.gmacs / (self.ms / 1e3)


@dataclass
class Settings:
    threads: int = 2
    repeats: int = 7
    quick: bool = False  # tiny models and inputs: checks the machinery, not the speed
    suites: tuple[str, ...] = SUITES
    compile: bool = True
    update: bool = False  # keep the other suites' rows of an earlier results.json in the folder
    precisions: tuple[str, ...] = PRECISIONS  # what the precision suite measures (where native)
    presets: tuple[str, ...] = ()  # the accuracy suite's presets (empty: all; --quick: digits)
    rows: list[Row] = field(default_factory=list)


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (the order rotates per round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - start)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 GEMM rate (GFLOP/s): the ceiling any model's arithmetic can reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = alternate({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * n**3 / t / 1e9


def _gmacs(model: nn.Module, shape: tuple[int, ...]) -> float | None:
    try:
        return complexity(model, shape).gmacs
    except Exception:  # a peer model the counter does not understand: leave the column empty
        return None


def _infer(model: nn.Module, x: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _compare(
    s: Settings,
    suite: str,
    setting: str,
    models: dict[str, nn.Module],
    x: torch.Tensor,
    twins: dict[str, nn.Module] | None = None,
) -> None:
    """Check each peer against our model carrying its weights (``twins[peer]``, else the first
    contender), then time all contenders on ``x``. Our speed does not depend on the weights'
    values, so one of our instances is timed against every peer."""
    names = list(models)
    for n in names[1:]:
        if not n.startswith("torchvision"):
            check_twins((twins or {}).get(n, models[names[0]]), models[n], x[:1])
    # Batch 1 is quick and the noisiest (run-to-run spread of 20-50% here): twice the repeats.
    repeats = 2 * s.repeats if x.shape[0] == 1 else s.repeats
    times = alternate({n: _infer(m, x) for n, m in models.items()}, repeats)
    for n in names:
        gm = _gmacs(models[n if n.startswith("torchvision") else names[0]], tuple(x.shape[1:]))
        s.rows.append(Row(suite, setting, n, 1e3 * times[n], repeats, None if gm is None else gm * x.shape[0]))


def suite_classify(s: Settings) -> None:
    """Batch 1: every variant (v2 against timm and HF, v1 against HF); batch 16: v2-b2 and
    PVT-Small; batch 32: v2-b2; ResNet-50 beside v2-b2 (about the same GMACs)."""
    import torchvision

    from pvt.models import list_models

    v2 = ["pvt_v2_b0"] if s.quick else list_models("pvt_v2_*")
    v1 = ["pvt_tiny"] if s.quick else ["pvt_tiny", "pvt_small", "pvt_medium", "pvt_large"]
    size = 64 if s.quick else 224
    plan = [(1, v2, v1)] if s.quick else [(1, v2, v1), (16, ["pvt_v2_b2"], ["pvt_small"]), (32, ["pvt_v2_b2"], [])]
    for batch, v2_names, v1_names in plan:
        x = torch.randn(batch, 3, size, size)
        for name in v2_names:
            ours, timm_model = timm_twins(name)
            ours_hf, hf_model = hf_twins(name)
            models = {"pvt-vision": ours, "timm": timm_model, "HF transformers": hf_model}
            if name == "pvt_v2_b2":
                models["torchvision resnet50"] = torchvision.models.resnet50().eval()
            _compare(s, "classify", f"{name} {size}px batch {batch}", models, x, {"HF transformers": ours_hf})
        # HF's v1 resizes its position tables only to 224 (its shortcut), so v1 runs at 224.
        x = torch.randn(batch, 3, 224, 224)
        for name in v1_names:
            ours, hf_model = hf_twins(name)
            _compare(s, "classify", f"{name} 224px batch {batch}", {"pvt-vision": ours, "HF transformers": hf_model}, x)


def suite_train(s: Settings) -> None:
    name, batch, size = ("pvt_v2_b0", 2, 64) if s.quick else ("pvt_v2_b2", 32, 224)
    ours, peer = timm_twins(name)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    steps: dict[str, Callable[[], Any]] = {}
    for label, model in (("pvt-vision", ours), ("timm", peer)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        steps[label] = step
    repeats = max(3, s.repeats // 2)
    times = alternate(steps, repeats)
    for label, t in times.items():
        s.rows.append(Row("train", f"{name} {size}px batch {batch} fwd+bwd+AdamW", label, 1e3 * t, repeats))


def suite_dense(s: Settings) -> None:
    import torchvision

    from pvt.detection import retinanet

    name = "pvt_v2_b0" if s.quick else "pvt_v2_b2"
    sizes = [(64, 64)] if s.quick else [(512, 512), (800, 1333)]
    ours, timm_model = timm_twins(name, features_only=True)
    ours_hf, hf_model = hf_twins(name, backbone=True)
    models = {"pvt-vision": ours, "timm": timm_model, "HF transformers": hf_model}
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        _compare(s, "dense", f"{name} features {h}x{w}", models, x, {"HF transformers": ours_hf})
    # End to end, torchvision's own resize included: the papers' PVT-vs-ResNet detector pair.
    h, w = (128, 128) if s.quick else (800, 1333)
    backbone = "pvt_tiny" if s.quick else "pvt_small"
    detectors = {
        "pvt-vision": retinanet(backbone).eval(),
        "torchvision resnet50": torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None
        ).eval(),
    }
    images = [torch.rand(3, h, w)]
    repeats = max(3, s.repeats // 2)
    times = alternate({n: _infer(m, images) for n, m in detectors.items()}, repeats)
    for n, t in times.items():
        s.rows.append(Row("dense", f"RetinaNet {backbone} vs resnet50, {h}x{w} image", n, 1e3 * t, repeats))


_MEMORY_SNIPPET = """
import json, torch
torch.set_num_threads({threads})
from pvt.benchmark import scaling_model
model = scaling_model({name!r}, {size})
x = torch.randn(1, 3, {size}, {size})
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1])  # kB
with torch.inference_mode():
    model(torch.randn(1, 3, 64, 64))  # warm: one-off state such as prepacked weights exists now
    # The first forward at this size: after it the allocator keeps freed pages, so a second one
    # would show only what it needs beyond them.
    before = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    model(x)
    after = status("VmHWM:")
print(json.dumps({{"peak_mib": (after - before) / 1024}}))
"""


def scaling_model(name: str, size: int) -> nn.Module:
    """A classifier that runs at ``size`` x ``size``: ours, or timm's ViT with dynamic input size."""
    if name.startswith("vit"):
        import timm

        return timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    from pvt.models import create_model

    return create_model(name).eval()


def peak_memory_mib(name: str, size: int, threads: int) -> float:
    """Peak resident memory a forward pass adds above the warm model (Linux: VmHWM after
    resetting it through /proc/self/clear_refs), measured in a fresh process: the activations'
    cost of the input size, without the weights or their prepacked copies."""
    code = _MEMORY_SNIPPET.format(name=name, size=size, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def suite_scaling(s: Settings) -> None:
    names = (
        ["pvt_v2_b0", "vit_tiny_patch16_224"]
        if s.quick
        else ["pvt_small", "pvt_v2_b2", "pvt_v2_b2_li", "vit_small_patch16_224"]
    )
    sizes = [64, 128] if s.quick else [224, 384, 512, 768, 1024]
    for size in sizes:
        x = torch.randn(1, 3, size, size)
        models = {n: scaling_model(n, size) for n in names}
        repeats = max(3, s.repeats // 2)
        times = alternate({n: _infer(m, x) for n, m in models.items()}, repeats)
        for n, m in models.items():
            gm = _gmacs(m, (3, size, size))
            s.rows.append(
                Row("scaling", f"{size}px", n, 1e3 * times[n], repeats, gm, peak_memory_mib(n, size, s.threads))
            )


def suite_precision(s: Settings) -> None:
    """fp32 / bf16 / int8 speed against the peers (``pvt.bench_precision``), with our fp32 path
    without its fused kernels or packed weights beside it."""
    from pvt import bench_precision

    bench_precision.speed(s)


def suite_accuracy(s: Settings) -> None:
    """The embedded presets' trained models at each precision (``pvt.bench_precision``)."""
    from pvt import bench_precision

    bench_precision.accuracy(s)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def train_rss(iterations: int, overrides: list[str] | None = None) -> dict[str, float]:
    """Train the digits classification preset for ``iterations`` in this process, as ``pvt train``
    does (freed memory kept), reading the resident set size (VmRSS) as each iteration's loss is
    computed. Returns MiB at the first iteration of epoch 2 (after epoch 1's evaluation and
    checkpoint) and after training (the final evaluation and weights written), and the median ms
    between iterations."""
    import itertools
    import statistics
    import tempfile

    from pvt.engine import Trainer, load_recipe
    from pvt.engine.presets import load_preset
    from pvt.tasks.classification import ClassificationTask

    samples: list[tuple[float, int]] = []  # (seconds, RSS KiB) per loss call

    class Sampled(ClassificationTask):
        def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
            samples.append((time.perf_counter(), _rss_kib()))
            return super().loss(model, batch, device)

    runtime.keep_freed_memory()
    task = Sampled()
    sets = [f"schedule.iterations={iterations}", "train.progress=false", *(overrides or [])]
    preset = load_preset("classification", "digits")
    recipe = load_recipe("classification", task.data_config, preset, sets, model_cls=task.model_config)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(task, recipe, tmp)
        trainer.fit()
        end = _rss_kib()
    per_epoch = trainer.iters_per_epoch
    if len(samples) <= per_epoch:
        raise ValueError(f"{iterations} iterations do not pass the first epoch ({per_epoch} iterations)")
    steps = [b[0] - a[0] for a, b in itertools.pairwise(samples)]
    return {"iterations": len(samples), "per_epoch": per_epoch, "batch": recipe.data.batch_size,
            "epoch1_mib": samples[per_epoch][1] / 1024, "end_mib": end / 1024,
            "ms": 1e3 * statistics.median(steps)}  # fmt: skip


_TRAIN_RSS_SNIPPET = """
import json, torch
torch.set_num_threads({threads})
from pvt.benchmark import train_rss
print(json.dumps(train_rss({iterations}, {overrides!r})))
"""


def suite_memory(s: Settings) -> None:
    """The leak check, in a fresh process (this one's RSS holds the other suites' models)."""
    iterations, sets = (8, ["data.batch_size=256"]) if s.quick else (200, [])
    code = _TRAIN_RSS_SNIPPET.format(threads=s.threads, iterations=iterations, overrides=sets)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the memory suite's training failed:\n{out.stderr[-3000:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    setting = (f"digits preset, batch {m['batch']}, {m['iterations']} iterations "
               f"({m['per_epoch']} per epoch)")  # fmt: skip
    s.rows.append(Row("memory", setting, "pvt-vision", m["ms"], int(m["iterations"]),
                      rss_epoch1_mib=m["epoch1_mib"], rss_end_mib=m["end_mib"]))  # fmt: skip


def _suite_serve(s: Settings) -> None:
    from pvt.serve.bench import suite_serve  # needs the serve extra

    suite_serve(s)


def _suite_deploy(s: Settings) -> None:
    from pvt.deploy.bench import suite_deploy  # needs the deploy extra (onnx, onnxruntime)

    suite_deploy(s)


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "timm", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "absent"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"), "cpu": cpu,
            "cores": str(os.cpu_count()), "threads": str(torch.get_num_threads()), **versions,
            "cpu flags": " ".join(f for f in CPU_FLAGS if f in cpu_info().flags) or "none of " + " ".join(CPU_FLAGS),
            "freed memory": "kept (pvt.runtime)" if runtime.keeps_freed_memory() else "returned to the OS"}  # fmt: skip


def report(rows: list[Row], info: dict[str, str], peaks: dict[str, float]) -> str:
    """Markdown: the machine, then one table per suite; ``speed-up`` is the contender's time over
    pvt-vision's in the same setting (above 1: pvt-vision is faster)."""
    from pvt import bench_precision

    peak = peaks["fp32"]
    lines = ["# pvt-vision benchmark results", "", "Generated by `pvt bench` / `python benchmarks/run.py`; "
             "contenders share weights (outputs checked equal first) and are timed in alternation, medians.", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info.items()],
             *[f"| {p} GEMM peak | {g:.1f} {'GOP' if p == 'int8' else 'GFLOP'}/s (2048x2048, best of before / after) |"
               for p, g in peaks.items()],
             ""]  # fmt: skip
    for suite in dict.fromkeys(r.suite for r in rows):
        lines += [f"## {suite}", ""]
        if suite in ("precision", "accuracy"):
            lines += bench_precision.tables([r for r in rows if r.suite == suite], peaks)
            continue
        if suite == "scaling":
            lines += _scaling_table([r for r in rows if r.suite == suite])
            continue
        if suite == "memory":
            lines += _memory_table([r for r in rows if r.suite == suite])
            continue
        if suite == "serve":
            lines += _serve_table([r for r in rows if r.suite == suite])
            continue
        lines += [
            "| setting | contender | ms | speed-up of pvt-vision | GFLOP/s | % of peak |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.suite == suite):
            ours = next((o for o in rows if o.setting == r.setting and o.contender.startswith("pvt-vision")), None)
            speed = "" if ours is None or ours is r else f"{r.ms / ours.ms:.2f}x"
            gf = r.gflops
            rate = "|  |  |" if gf is None else f"| {gf:.1f} | {100 * gf / peak:.0f}% |"
            lines.append(f"| {r.setting} | {r.contender} | {r.ms:.1f} | {speed} {rate}")
        lines.append("")
        notes = [f"* {r.setting}, {r.contender}: {r.note}" for r in rows if r.suite == suite and r.note]
        lines += [*notes, ""] if notes else []
    return "\n".join(lines) + "\n"


def _scaling_table(rows: list[Row]) -> list[str]:
    names = list(dict.fromkeys(r.contender for r in rows))
    out = ["Latency (ms) and peak memory added by one forward (MiB), batch 1:", "",
           "| input | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for setting in dict.fromkeys(r.setting for r in rows):
        cells = []
        for n in names:
            r = next(r for r in rows if r.setting == setting and r.contender == n)
            cells.append(f"{r.ms:.0f} ms / {r.peak_mib:.0f} MiB")
        out.append(f"| {setting} | " + " | ".join(cells) + " |")
    return [*out, ""]


def _memory_table(rows: list[Row]) -> list[str]:
    out = ["Resident memory (VmRSS) of `pvt train` in a fresh process, after the first epoch (its evaluation "
           f"and checkpoint included) and at the end; a leak check, bound {MEMORY_BOUND_PCT:g}%:", "",
           "| setting | ms / iteration | RSS after epoch 1 (MiB) | RSS at end (MiB) | growth | result |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        growth = r.growth_pct
        assert growth is not None, r
        verdict = "pass" if growth < MEMORY_BOUND_PCT else "FAIL"
        out.append(
            f"| {r.setting} | {r.ms:.0f} | {r.rss_epoch1_mib:.0f} | {r.rss_end_mib:.0f} | {growth:+.1f}% | {verdict} |"
        )
    return [*out, ""]


def _serve_table(rows: list[Row]) -> list[str]:
    out = ["`pvt serve` in a subprocess, clients on keep-alive connections (pvt.serve.bench):", "",
           "| setting | server | requests/s | p50 ms | p99 ms | requests | mean batch |", "|---" * 7 + "|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r.setting} | {r.contender} | {r.rps:.1f} | {r.ms:.0f} | {r.p99_ms:.0f} | {r.repeats} | "
                   f"{r.note.removeprefix('mean batch ')} |")  # fmt: skip
    return [*out, ""]


def plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """``scaling.png`` (latency and memory against input size) and ``speedups.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pvt.io import atomic_write

    written = []
    scaling = [r for r in rows if r.suite == "scaling"]
    if scaling:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for n in dict.fromkeys(r.contender for r in scaling):
            mine = [r for r in scaling if r.contender == n]
            sizes = [int(r.setting.removesuffix("px")) for r in mine]
            a.plot(sizes, [r.ms for r in mine], marker="o", label=n)
            b.plot(sizes, [r.peak_mib or 0 for r in mine], marker="o", label=n)
        a.set(xlabel="input side (px)", ylabel="latency, batch 1 (ms)", yscale="log", title="latency")
        b.set(xlabel="input side (px)", ylabel="peak memory of a forward (MiB)", yscale="log", title="memory")
        a.legend()
        path = out_dir / "scaling.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        written.append(path)
    pairs = []
    for r in rows:
        ours = next((o for o in rows if o.setting == r.setting and o.contender == "pvt-vision"), None)
        if ours is not None and r is not ours and r.suite in ("classify", "train", "dense"):
            pairs.append((f"{r.setting}\nvs {r.contender}", r.ms / ours.ms))
    if pairs:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(pairs) + 1), constrained_layout=True)
        ax.barh(
            [p[0] for p in pairs], [p[1] for p in pairs], color=["tab:green" if p[1] >= 1 else "tab:red" for p in pairs]
        )
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set(xlabel="contender's time / pvt-vision's time (above 1: pvt-vision faster)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        path = out_dir / "speedups.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def run(settings: Settings, out_dir: str | Path) -> Path:
    """Run the chosen suites; write ``RESULTS.md``, ``results.json`` and the plots to ``out_dir``."""
    from pvt.io import atomic_write

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime.keep_freed_memory()  # every contender runs without per-forward page faults
    flushed = torch.set_flush_denormal(True)  # for every contender alike (random weights can hit denormals)
    info = {**machine(), "denormals": "flushed to zero, every contender" if flushed else "not flushable here"}
    peaks = gemm_peaks(256 if settings.quick else 2048)
    if settings.update and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        settings.rows += [Row(**r) for r in old["rows"] if r["suite"] not in settings.suites]
    suites = {"classify": suite_classify, "train": suite_train, "dense": suite_dense,
              "scaling": suite_scaling, "precision": suite_precision, "accuracy": suite_accuracy,
              "memory": suite_memory, "serve": _suite_serve, "deploy": _suite_deploy}  # fmt: skip
    for name in settings.suites:
        if name not in suites:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES + EXTRA_SUITES)}")
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        suites[name](settings)
    # A busy moment lowers a peak and would inflate every row's share of it: measure again after
    # the suites and keep the higher figure of each precision.
    later = gemm_peaks(256 if settings.quick else 2048)
    peaks = {k: max(v, later.get(k, v)) for k, v in peaks.items()}
    text = report(settings.rows, info, peaks)
    atomic_write(out / "RESULTS.md", lambda tmp: Path(tmp).write_text(text))
    data = json.dumps(
        {
            "machine": info,
            "matmul_peak_gflops": peaks["fp32"],
            "gemm_peaks": peaks,
            "rows": [asdict(r) for r in settings.rows],
        },
        indent=1,
    )
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(data + "\n"))
    plots(settings.rows, out)
    return out / "RESULTS.md"


__all__ = [
    "EXTRA_SUITES",
    "MEMORY_BOUND_PCT",
    "SUITES",
    "Row",
    "Settings",
    "alternate",
    "matmul_peak_gflops",
    "report",
    "run",
    "train_rss",
]
