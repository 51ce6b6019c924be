"""``pvt bench`` (or ``python benchmarks/run.py``): run the chosen suites, write ``RESULTS.md``,
``results.json`` and the plots. The process keeps freed memory (``pvt.runtime``) and flushes
denormals, for every contender alike; the machine's GEMM peak in each precision is measured before
and after the suites."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pvt.bench.harness import Row, Settings, gemm_peaks, machine, suites
from pvt.bench.report import plots, report
from pvt.runtime import malloc as runtime


def run(settings: Settings, out_dir: str | Path) -> Path:
    """Run the chosen suites; write ``RESULTS.md``, ``results.json`` and the plots to ``out_dir``."""
    from pvt.utils.files import atomic_write

    registered = suites()
    if unknown := [name for name in settings.suites if name not in registered]:
        raise ValueError(f"unknown suite {unknown[0]!r}; choose from {', '.join(registered)}")
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
    for name in settings.suites:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        entry = registered[name]
        try:
            entry.run(settings)
        except ModuleNotFoundError as e:
            if not entry.needs:
                raise
            extras = ",".join(entry.needs)
            raise ModuleNotFoundError(f"{e} (the {name} suite needs pvt-vision[{extras}])", name=e.name) from e
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
            "rows": [r.to_dict() for r in settings.rows],
        },
        indent=1,
    )
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(data + "\n"))
    plots(settings.rows, out)
    return out / "RESULTS.md"


__all__ = ["run"]
