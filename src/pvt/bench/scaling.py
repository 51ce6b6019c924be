"""The ``scaling`` suite: latency and peak memory from 224 to 1024 px, batch 1: PVT-Small, v2-b2
and v2-b2-li against timm's ViT-Small/16 (dynamic input size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from pvt.bench.harness import Row, Settings, alternate, infer, model_gmacs, suite
from pvt.bench.report import pyplot, save_png

_MEMORY_SNIPPET = """
import json, torch
torch.set_num_threads({threads})
from pvt.bench.scaling import scaling_model
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


def scaling_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
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


def scaling_plots(rows: list[Row], out_dir: Path) -> list[Path]:
    """``scaling.png``: latency and memory against input size."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for n in dict.fromkeys(r.contender for r in rows):
        mine = [r for r in rows if r.contender == n]
        sizes = [int(r.setting.removesuffix("px")) for r in mine]
        a.plot(sizes, [r.ms for r in mine], marker="o", label=n)
        b.plot(sizes, [r.get("peak_mib") or 0 for r in mine], marker="o", label=n)
    a.set(xlabel="input side (px)", ylabel="latency, batch 1 (ms)", yscale="log", title="latency")
    b.set(xlabel="input side (px)", ylabel="peak memory of a forward (MiB)", yscale="log", title="memory")
    a.legend()
    return [save_png(fig, out_dir / "scaling.png")]


@suite("scaling", table=scaling_table, plots=scaling_plots, needs="peers")
def scaling(s: Settings) -> None:
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
        times = alternate({n: infer(m, x) for n, m in models.items()}, repeats)
        for n, m in models.items():
            gm = model_gmacs(m, (3, size, size))
            s.rows.append(Row("scaling", f"{size}px", n, 1e3 * times[n], repeats, gmacs=gm,
                              peak_mib=peak_memory_mib(n, size, s.threads)))  # fmt: skip


__all__ = ["peak_memory_mib", "scaling", "scaling_model", "scaling_plots", "scaling_table"]
