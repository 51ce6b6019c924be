"""The embedded presets as whole training runs: wall time and final metric, per seed and setting.

Each record is one ``pvt train`` of a shipped preset (its own settings, plus any ``--set``), timed
from start to exit, with the final evaluation's numbers, the mean time each step waited for its
batch, and the machine's fp32 GEMM speed just before and after (the better of the two): the same
CPU model runs slower on some days, and the GEMM figure tells a slower day from a slower step.
Records accumulate in ``results.json`` beside this file; ``render`` writes
``RESULTS.md`` from them, grouped by preset, so a change's before and after sit side by side.

    python benchmarks/presets/run.py train classification digits --label "20 epochs" --seeds 0 1
    python benchmarks/presets/run.py train detection shapes-retinanet --label "hard, 6 epochs" \\
        --seeds 0 1 --set data.shapes.style=hard --set schedule.epochs=6
    python benchmarks/presets/run.py render
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


def final_metrics(run_dir: Path) -> tuple[dict[str, float], float, int]:
    """(the last evaluation's numbers, mean data wait in ms per step, iterations) of a run."""
    evals, waits, iteration = [], [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "eval":
            evals.append(rec)
        elif rec.get("type") == "train":
            iteration = max(iteration, int(rec["iteration"]))
            if "data_wait_ms" in rec:
                waits.append(float(rec["data_wait_ms"]))
    last = evals[-1] if evals else {}
    skip = {"epoch", "iteration", "count", "type"}
    numbers = {k: float(v) for k, v in last.items() if k not in skip and isinstance(v, int | float)}
    return numbers, (sum(waits) / len(waits) if waits else float("nan")), iteration


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matrix product on this process's threads, best of ``repeats``."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def record(
    task: str, preset: str, label: str, seed: int, sets: list[str], run_dir: Path, wall_s: float, gemm: float
) -> dict[str, Any]:
    from pvt.utils.hardware import cpu_info

    metrics, wait_ms, iterations = final_metrics(run_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    return {
        "task": task, "preset": preset, "label": label, "seed": seed, "sets": sets, "wall_s": round(wall_s, 1),
        "iterations": iterations, "metrics": metrics, "data_wait_ms": round(wait_ms, 1),
        "cpu": cpu_info().describe(), "cores": os.cpu_count(), "gemm_gflops": round(gemm, 1), "commit": commit.strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M+00:00"),
    }  # fmt: skip


def save(records: list[dict[str, Any]]) -> None:
    from pvt.utils.files import atomic_write

    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    text = json.dumps(old + records, indent=1) + "\n"
    atomic_write(RESULTS, lambda tmp: Path(tmp).write_text(text))


def train(args: argparse.Namespace) -> None:
    for seed in args.seeds:
        sets = [*args.set, f"train.seed={seed}"]
        with tempfile.TemporaryDirectory(prefix="pvt-preset-") as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "pvt.cli", "train", args.task, "--preset", args.preset, "--output",
                   str(run_dir), "--set", "train.progress=false", *[x for s in sets for x in ("--set", s)]]  # fmt: skip
            gemm = gemm_gflops()
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            wall_s = time.perf_counter() - start
            gemm = max(gemm, gemm_gflops())
            rec = record(args.task, args.preset, args.label, seed, args.set, run_dir, wall_s, gemm)
        print(json.dumps(rec), flush=True)
        save([rec])  # each run kept as soon as it ends: a long series can stop midway
    render()


def headline(task: str, metrics: dict[str, float]) -> str:
    """The task's own headline numbers (top-1, box AP, mIoU ...) as one cell."""
    from pvt.tasks import get_task

    names = [n for n in getattr(get_task(task), "headline", ()) if n in metrics] or sorted(metrics)
    return ", ".join(f"{n} {metrics[n]:.1f}" for n in names)


def render() -> None:
    from pvt.utils.files import atomic_write

    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    out = ["# Embedded presets: wall time and metric", "",
           "Generated by `python benchmarks/presets/run.py render` from `results.json`; each row is one",
           "`pvt train` run of the shipped preset with the settings shown, timed from start to exit",
           "(data generation on first use included), the final evaluation's numbers, the mean time a",
           "training step waited for its batch, and the machine's fp32 GEMM speed around the run (the same",
           "CPU model is slower on some days: compare steps against it, not minutes across days; blank",
           "where not recorded).", ""]  # fmt: skip
    for key in dict.fromkeys((r["task"], r["preset"]) for r in records):
        rows = [r for r in records if (r["task"], r["preset"]) == key]
        out += [f"## {key[1]} ({key[0]})", "",
                "| setting | settings added | seed | steps | wall (min) | final metrics | data wait (ms/step) "
                "| cpu, cores | GEMM (GFLOP/s) | commit, date |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            out.append(
                f"| {r['label']} | {' '.join(f'`{s}`' for s in r['sets']) or '-'} | {r['seed']} | {r['iterations']} "
                f"| {r['wall_s'] / 60:.1f} | {headline(r['task'], r['metrics'])} | {r['data_wait_ms']:.0f} "
                f"| {r['cpu']}, {r['cores']} | {r.get('gemm_gflops', '')} | {r['commit']}, {r['date'][:10]} |"
            )
        out.append("")
    text = "\n".join(out)
    atomic_write(HERE / "RESULTS.md", lambda tmp: Path(tmp).write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a preset once per seed and record each run")
    t.add_argument("task")
    t.add_argument("preset")
    t.add_argument("--label", required=True, help="what this setting is, e.g. 'before' or '10 epochs'")
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--set", action="append", default=[], help="a recipe override, as pvt train's --set")
    sub.add_parser("render", help="write RESULTS.md from results.json")
    args = parser.parse_args()
    train(args) if args.command == "train" else render()


if __name__ == "__main__":
    main()
