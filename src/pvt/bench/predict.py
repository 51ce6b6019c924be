"""The ``predict`` suite of ``pvt bench`` (not in the default run): ``pvt predict --out`` over whole
collections, in a subprocess, against the same model's batched forward on inputs already decoded
and prepared (the ceiling).

* Throughput: a PVT v2-b0 classifier at 224 px on 1,000 JPEGs of 320x240, and the shapes RetinaNet
  (the ``shapes-retinanet`` preset's model, untrained: speed does not depend on the weights' values;
  it finds nothing, so its records are short) on 160 rendered 256 px shapes scenes (PNG, as the
  embedded data set stores them). images/s for each ``--workers`` (0, 1, 2) x ``--batch-size`` (1,
  8, 32); the best combination's share of the best ceiling (the goal: :data:`GOAL_PCT`) and its
  speed-up over one image at a time (``--workers 0 --batch-size 1``, what ``pvt predict`` did before
  collections). 2,000 classifier images would take the whole suite past 15 minutes on 2 cores.
* Memory: the peak resident memory (VmHWM) of one ``pvt predict`` run over 10,000 small images (64
  px), as its journal reaches 1,000 records and just before its last batch, for the main process
  and with its decoding workers; bound :data:`MEMORY_BOUND_PCT`.
* Sharding: torchrun with 2 processes (1 thread each) beside one process on the classifier's
  images, and ``--engine ray --actors 2`` where ``ray`` imports and ``pvt predict`` has ``--engine``
  (a row says why not otherwise).

A run's images/s counts from its ``manifest.json`` (written as predicting starts, after imports and
the model build) to its last file (the last record, or a derived file written after): what a long
collection sees; the time to its first records and the rate after them show the start-up apart;
``wall s`` is the whole command. Every process gets the settings' threads (``OMP_NUM_THREADS``; the
sharded ones 1 each); the ceiling runs in this process on as many. Each combination runs once (a
run is hundreds of images); the ceiling is measured before, amid and after its model's runs, median.
``--quick``: 64 px classifier and 128 px detector inputs, three runs, no Ray.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvt.bench.harness import Row, Settings, suite
from pvt.bench.memory import MEMORY_BOUND_PCT, growth_pct

GOAL_PCT = 85.0  # the best combination's images/s as a share of the ceiling's
WORKERS = (0, 1, 2)
BATCHES = (1, 8, 32)
ONE_AT_A_TIME = (0, 1)  # (--workers, --batch-size) of the old pvt predict
RAY = "--engine ray --actors 2"


@dataclass(frozen=True)
class Plan:
    """How much a run measures (full, or ``--quick``: tiny inputs, two combinations)."""

    classify_px: int
    classify_images: int
    detect_px: int
    detect_images: int
    grid: tuple[tuple[int, int], ...]  # the classifier's (--workers, --batch-size)
    detect_grid: tuple[tuple[int, int], ...]  # the detector's
    ceiling_seconds: float  # per batch size and measurement
    memory_px: int
    memory_images: tuple[int, int]  # RSS read after the first, and at the end of a run of the second
    memory_options: tuple[int, int]  # (--workers, --batch-size) of the memory run


GRID = tuple((w, b) for w in WORKERS for b in BATCHES)
FULL = Plan(224, 1_000, 256, 160, GRID, GRID, 1.5, 64, (1_000, 10_000), (2, 8))
QUICK = Plan(64, 40, 128, 16, ((0, 1), (2, 8)), ((2, 8),), 0.2, 64, (100, 400), (2, 8))


@dataclass
class Run:
    """One ``pvt predict`` command: its records, seconds predicting (manifest to last file), wall seconds."""

    images: int
    seconds: float
    wall: float
    seen: dict[str, float] = field(default_factory=dict)  # what follow_run saw
    first_s: float | None = None  # manifest to the first records
    steady: float | None = None  # images/s after the first records

    @property
    def rate(self) -> float:
        return self.images / self.seconds


# ---------------------------------------------------------------------------------------------- inputs


def _jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` JPEGs (``size`` = width, height) of smooth colour fields with a little grain, as a
    photo compresses (64 distinct pictures, repeated under new names)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    folder.mkdir(parents=True, exist_ok=True)
    encoded = []
    for _ in range(min(count, 64)):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = coarse.resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(field, np.float32) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    for i in range(count):
        (folder / f"{i:06d}.jpg").write_bytes(encoded[i % len(encoded)])
    return folder


def _scenes(folder: Path, count: int, px: int, seed: int = 0) -> Path:
    """``count`` shapes scenes of ``px`` pixels, PNG as the embedded data set stores them."""
    from PIL import Image

    from pvt.datasets.shapes import ShapesSpec, render_scene

    rng = np.random.default_rng(seed)
    spec = ShapesSpec(image_size=px)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels, _ = render_scene(rng, spec)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    return folder


def _classifier(run: Path, px: int) -> Path:
    """A run folder as ``pvt train`` leaves it: an untrained PVT v2-b0 classifier at ``px``."""
    from pvt.checkpoint import save_safetensors
    from pvt.engine import load_recipe
    from pvt.tasks import get_task

    task = get_task("classification")
    sets = ["model.name=pvt_v2_b0", "model.num_classes=10", f"data.input_size={px}"]
    recipe = load_recipe("classification", task.data_config, {}, sets, model_cls=task.model_config)
    run.mkdir(parents=True, exist_ok=True)
    recipe.dump(run / "config.yaml")
    (run / "task.json").write_text(json.dumps({"classes": [f"class{i}" for i in range(10)]}))
    torch.manual_seed(0)
    save_safetensors(task.build_model(recipe).state_dict(), run / "model.safetensors", arch="pvt_v2_b0")
    return run / "model.safetensors"


def _detector(run: Path, px: int) -> Path:
    """A run folder of the ``shapes-retinanet`` preset's model (untrained), resizing to ``px``."""
    from pvt.checkpoint import save_safetensors
    from pvt.datasets.shapes import CLASSES
    from pvt.engine import load_recipe
    from pvt.engine.presets import load_preset
    from pvt.tasks import get_task

    task = get_task("detection")
    preset = load_preset("detection", "shapes-retinanet")
    sets = [] if px == 256 else [f"model.min_size=[{px}]", f"model.max_size={px}"]
    recipe = load_recipe("detection", task.data_config, preset, sets, model_cls=task.model_config)
    run.mkdir(parents=True, exist_ok=True)
    recipe.dump(run / "config.yaml")
    artifacts = {"classes": list(CLASSES), "category_ids": list(range(1, len(CLASSES) + 1)), "label_offset": 0}
    (run / "task.json").write_text(json.dumps(artifacts))
    torch.manual_seed(0)
    save_safetensors(task.build_model(recipe).state_dict(), run / "model.safetensors", arch=recipe.model.name)
    return run / "model.safetensors"


# ---------------------------------------------------------------------------------------------- runs


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _predict_cmd(task: str, weights: Path, inputs: Path, out: Path, *options: str) -> list[str]:
    return ["-m", "pvt.cli", "predict", task, "--checkpoint", str(weights), str(inputs), "--out", str(out), *options]


def _lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_predict(
    cmd: Sequence[str],
    out: Path,
    threads: int,
    expect: int,
    *,
    follow: bool = False,
    memory: int | None = None,
) -> Run:
    """Run ``python cmd...`` (a ``pvt predict --out out``, perhaps under a launcher); check it
    recorded ``expect`` images; time it from its manifest to its last file. ``follow``: also when
    its first records appear (one process: its journal is written as it goes); ``memory``: also its
    peak memory after that many records, before its last batch and at its exit (:func:`follow_run`).
    ``out`` is removed after."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.DEVNULL, stderr=log, env=_env(threads))
        try:
            seen = follow_run(proc, out, expect, memory) if follow or memory else {}
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - start
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n{log.read().decode(errors='replace')[-3000:]}")
    try:
        records = _lines(out / "predictions.jsonl")
        if records != expect:
            raise RuntimeError(f"{' '.join(cmd)}: {records} records, expected {expect}")
        manifest = out / "manifest.json"
        began = manifest.stat().st_mtime if manifest.is_file() else None
        ended = max(p.stat().st_mtime for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run = Run(records, max(ended - began, 1e-6) if began is not None else wall, wall, seen)
    if began is not None and "first_at" in seen:
        run.first_s = seen["first_at"] - began
        if records > seen["first_records"]:
            run.steady = (records - seen["first_records"]) / max(ended - seen["first_at"], 1e-6)
    return run


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a run's DataLoader workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(d.name))
    return found


def follow_run(proc: subprocess.Popen[bytes], out: Path, total: int, memory: int | None) -> dict[str, float]:
    """Read a one-process run's journal as it grows (every 20 ms): the wall-clock time its first
    records appeared (``first_at``, ``first_records``). With ``memory`` (every 50 ms): the peak
    resident memory (VmHWM, MiB) of its main process and the sum of its decoding workers' peaks,
    read as its journal first held ``memory`` records or more (``*_first_mib``, ``at_first``), in the
    last reading before its final batch appeared (``*_end_mib``, ``at_end``: before the run winds
    up and the interpreter exits), and the main process's last reading (``main_exit_mib``: exit
    touches code pages of its libraries that the run never did)."""
    journal = out / "predictions.jsonl"
    every = 0.05 if memory else 0.02
    offset, records = 0, 0
    seen: dict[str, float] = {}
    main_peak = 0
    workers: dict[int, int] = {}  # pid -> its VmHWM, KiB
    while proc.poll() is None:
        if memory:  # memory first, then the journal: the reading is of a run with at most that many records
            main_peak = max(main_peak, _status_kib(proc.pid, "VmHWM:") or 0)
            for child in _children(proc.pid):
                workers[child] = max(workers.get(child, 0), _status_kib(child, "VmHWM:") or 0)
        if journal.is_file():
            with journal.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            records += chunk.count(b"\n")
        now = time.time()
        if records and "first_at" not in seen:
            seen.update(first_at=now, first_records=records)
        if memory and records >= memory and "at_first" not in seen:
            seen.update(main_first_mib=main_peak / 1024, workers_first_mib=sum(workers.values()) / 1024,
                        at_first=records)  # fmt: skip
        if memory and records < total:
            seen.update(main_end_mib=main_peak / 1024, workers_end_mib=sum(workers.values()) / 1024, at_end=records)
        time.sleep(every)
    if memory:
        if "at_first" not in seen or "at_end" not in seen:
            raise RuntimeError(f"the memory run ended before it was read at {memory} records and before its end")
        seen["main_exit_mib"] = main_peak / 1024
    return seen


def ceiling(predictor: Any, inputs: list[torch.Tensor], batch: int, seconds: float) -> tuple[float, int]:
    """(images/s, images) of ``predictor.forward`` on inputs already prepared, ``batch`` at a time:
    one warm-up batch, then batches for ``seconds`` (two at least)."""
    batches = [[inputs[(i + j) % len(inputs)] for j in range(batch)] for i in range(0, len(inputs), batch)]
    predictor.forward(batches[0])
    done, start = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - start < seconds:
        predictor.forward(batches[done % len(batches)])
        done += 1
    return done * batch / (time.perf_counter() - start), done * batch


def _prepared(weights: Path, inputs: Path, count: int) -> tuple[Any, list[torch.Tensor]]:
    """The predictor ``pvt predict`` builds for ``weights``, and the first ``count`` images of
    ``inputs`` decoded and prepared as it prepares them."""
    from pvt.inference import collect, decode_image, read_bytes, resolve

    task, model, recipe, artifacts = resolve(weights)
    predictor = task.predictor(model, recipe, artifacts)
    items = collect([str(inputs)])[:count]
    return predictor, [predictor.prepare(decode_image(read_bytes(it), it.id)) for it in items]


def _options(workers: int, batch: int) -> str:
    return f"--workers {workers} --batch-size {batch}"


def _grid(s: Settings, plan: Plan, root: Path, grid: tuple[tuple[int, int], ...], setting: str, task: str,
          weights: Path, inputs: Path, images: int) -> None:  # fmt: skip
    """Every combination of ``grid`` on ``inputs``; the ceiling at each of its batch sizes before,
    amid and after them."""
    predictor, prepared = _prepared(weights, inputs, min(images, 32))
    ceilings: dict[int, list[tuple[float, int]]] = {b: [] for b in sorted({b for _, b in grid})}

    def measure_ceiling() -> None:
        for b in ceilings:
            ceilings[b].append(ceiling(predictor, prepared, b, plan.ceiling_seconds))

    measure_ceiling()
    runs: dict[tuple[int, int], Run] = {}
    for i, (w, b) in enumerate(grid):
        out = root / f"out-{task}-{w}-{b}"
        runs[(w, b)] = run_predict(_predict_cmd(task, weights, inputs, out, *_options(w, b).split()), out,
                                   s.threads, images, follow=True)  # fmt: skip
        if i == len(grid) // 2 - 1:
            measure_ceiling()
    measure_ceiling()
    for b, measured in ceilings.items():
        rate = statistics.median(r for r, _ in measured)
        s.rows.append(Row("predict", setting, f"ceiling: forward, batch {b}", 1e3 / rate, len(measured),
                          kind="ceiling", images_per_s=rate, batch=b, images=sum(n for _, n in measured),
                          samples=[round(r, 2) for r, _ in measured]))  # fmt: skip
    for (w, b), r in runs.items():
        s.rows.append(Row("predict", setting, _options(w, b), 1e3 / r.rate, 1, kind="predict", images_per_s=r.rate,
                          workers=w, batch=b, images=r.images, wall_s=r.wall, first_s=r.first_s,
                          steady_images_per_s=r.steady))  # fmt: skip


def _memory(s: Settings, plan: Plan, root: Path) -> None:
    first, total = plan.memory_images
    weights = _classifier(root / "memory-run", plan.memory_px)
    inputs = _jpegs(root / "memory-in", total, (plan.memory_px * 5 // 4, plan.memory_px), seed=1)
    w, b = plan.memory_options
    out = root / "memory-out"
    r = run_predict(_predict_cmd("classification", weights, inputs, out, *_options(w, b).split()), out, s.threads,
                    total, memory=first)  # fmt: skip
    m = r.seen
    main_first, main_end = m["main_first_mib"], m["main_end_mib"]
    all_first, all_end = main_first + m["workers_first_mib"], main_end + m["workers_end_mib"]
    setting = f"memory: pvt_v2_b0 classifier {plan.memory_px}px, {total} JPEGs"
    s.rows.append(Row("predict", setting, _options(w, b), 1e3 / r.rate, 1, kind="memory", images_per_s=r.rate,
                      images=total, first=int(m["at_first"]), last=int(m["at_end"]), wall_s=r.wall,
                      rss_first_mib=main_first, rss_end_mib=main_end, growth_pct=growth_pct(main_first, main_end),
                      all_first_mib=all_first, all_end_mib=all_end, all_growth_pct=growth_pct(all_first, all_end),
                      rss_exit_mib=m["main_exit_mib"]))  # fmt: skip
    shutil.rmtree(inputs, ignore_errors=True)


def _ray_missing() -> str | None:
    """Why the Ray row is skipped, or None when ``ray`` imports and ``pvt predict`` has ``--engine``."""
    if importlib.util.find_spec("ray") is None:
        return "ray extra not installed"
    shown = subprocess.run([sys.executable, "-m", "pvt.cli", "predict", "--help"], capture_output=True, text=True)
    if "--engine" not in shown.stdout:
        return "pvt predict has no --engine option"
    return None


def _sharding(s: Settings, plan: Plan, root: Path, weights: Path, inputs: Path, images: int) -> None:
    """One process (the settings' threads) beside torchrun with 2 processes of 1 thread, same images
    and options (no decoding workers: the processes are the parallelism)."""
    setting = f"sharding: pvt_v2_b0 classifier {plan.classify_px}px, {images} JPEGs, --workers 0 --batch-size 8"
    options = ["--workers", "0", "--batch-size", "8"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs: dict[str, Run] = {}
    for name, launcher, threads in [(f"1 process, {s.threads} thread{'s' if s.threads > 1 else ''}", [], s.threads),
                                    ("torchrun, 2 processes x 1 thread", torchrun, 1)]:  # fmt: skip
        out = root / "out-sharding"
        runs[name] = run_predict([*launcher, *_predict_cmd("classification", weights, inputs, out, *options)], out,
                                 threads, images)  # fmt: skip
    ray_note = "not run with --quick (starting Ray takes longer than the rest)" if plan is QUICK else _ray_missing()
    if ray_note is None:
        out = root / "out-ray"
        cmd = _predict_cmd("classification", weights, inputs, out, "--engine", "ray", "--actors", "2", *options[2:])
        try:
            runs[RAY] = run_predict(cmd, out, 1, images)
        except RuntimeError as e:
            ray_note = f"the ray run failed: {str(e).strip().splitlines()[-1][:200]}"
    one = next(iter(runs.values()))
    for name, r in runs.items():
        note = "its time includes starting and stopping a local Ray instance" if name == RAY else None
        s.rows.append(Row("predict", setting, name, 1e3 / r.rate, 1, kind="sharding", images_per_s=r.rate,
                          images=r.images, wall_s=r.wall, overhead_pct=100 * (one.rate / r.rate - 1),
                          note=note))  # fmt: skip
    if ray_note is not None:
        s.rows.append(Row("predict", setting, RAY, 0.0, 0, kind="sharding", skipped=True, note=f"skipped: {ray_note}"))


# ---------------------------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "" if x is None else format(x, spec)


def best_of(rows: list[Row]) -> dict[str, Any] | None:
    """The throughput summary of one setting's rows: the best combination, its share of the best
    ceiling, its speed-up over one at a time; None without runs."""
    runs = [r for r in rows if r.get("kind") == "predict"]
    ceilings = [r for r in rows if r.get("kind") == "ceiling"]
    if not runs:
        return None
    best = max(runs, key=lambda r: r.images_per_s)
    top = max(ceilings, key=lambda r: r.images_per_s) if ceilings else None
    one = next((r for r in runs if (r.get("workers"), r.get("batch")) == ONE_AT_A_TIME), None)
    return {"best": best, "ceiling": top, "pct": None if top is None else 100 * best.images_per_s / top.images_per_s,
            "speedup": None if one is None else best.images_per_s / one.images_per_s}  # fmt: skip


def predict_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    out = ["`pvt predict --out` in a subprocess against the same model's batched forward on inputs already "
           "decoded and prepared (the ceiling: in the bench process, the same threads, measured before, amid and "
           "after the runs, median). A run's images/s counts from its manifest.json (after imports and the model "
           "build) to its last file; `first records s`: from the manifest to its first records in the journal, "
           "`after them`: images/s from there; `wall s`: the whole command (pvt.bench.predict):", "",
           "| setting | contender | images/s | ms / image | % of best ceiling | speed-up over one at a time | "
           "first records s | after them, images/s | wall s |", "|---" * 9 + "|"]  # fmt: skip
    settings = list(dict.fromkeys(r.setting for r in rows if r.get("kind") in ("predict", "ceiling")))
    summaries = []
    for setting in settings:
        mine = [r for r in rows if r.setting == setting]
        summary = best_of(mine)
        top = summary["ceiling"] if summary else None
        one = next((r for r in mine if (r.get("workers"), r.get("batch")) == ONE_AT_A_TIME), None)
        for r in mine:
            pct = None if top is None else 100 * r.images_per_s / top.images_per_s
            up = None if one is None or r.get("kind") != "predict" else r.images_per_s / one.images_per_s
            out.append(f"| {setting} | {r.contender} | {r.images_per_s:.1f} | {r.ms:.1f} | {_fmt(pct, '.0f')}% | "
                       f"{_fmt(up, '.2f')}{'x' if up is not None else ''} | {_fmt(r.get('first_s'), '.2f')} | "
                       f"{_fmt(r.get('steady_images_per_s'))} | {_fmt(r.get('wall_s'))} |")  # fmt: skip
        if summary is not None:
            b, pct = summary["best"], summary["pct"]
            verdict = "" if pct is None else f" (goal {GOAL_PCT:g}%: {'met' if pct >= GOAL_PCT else 'MISSED'})"
            samples = "; ".join(f"batch {r.batch}: {' / '.join(f'{x:.1f}' for x in r.samples)}" for r in mine
                                if r.get("kind") == "ceiling" and r.get("samples"))  # fmt: skip
            spread = f" (the ceiling's measurements, images/s: {samples})." if samples else "."
            up = "" if summary["speedup"] is None else f", {summary['speedup']:.2f}x one at a time"
            summaries.append(f"* {setting}: best `{b.contender}`, {b.images_per_s:.1f} images/s, "
                             f"{_fmt(pct, '.0f')}% of the ceiling{verdict}{up}{spread}")  # fmt: skip
    out += ["", *summaries, ""]
    memory = [r for r in rows if r.get("kind") == "memory"]
    if memory:
        out += [f"Peak resident memory (VmHWM, MiB) of one `pvt predict` run, read as its journal reached the first "
                f"count and in the last reading before its final batch; the main process, then the main process "
                f"plus its decoding workers (their peaks summed; they share pages); bound {MEMORY_BOUND_PCT:g}%. "
                f"`at exit`: the main process's last reading (exit touches library pages the run never did):", "",
                "| setting | options | images/s | records | main | records | main | growth | with workers | "
                "growth | at exit | result |", "|---" * 12 + "|"]  # fmt: skip
        for r in memory:
            verdict = "pass" if max(r.growth_pct, r.all_growth_pct) < MEMORY_BOUND_PCT else "FAIL"
            out.append(f"| {r.setting} | {r.contender} | {r.images_per_s:.1f} | {r.first} | {r.rss_first_mib:.0f} | "
                       f"{r.get('last', '')} | {r.rss_end_mib:.0f} | {r.growth_pct:+.1f}% | "
                       f"{r.all_first_mib:.0f} -> {r.all_end_mib:.0f} | {r.all_growth_pct:+.1f}% | "
                       f"{_fmt(r.get('rss_exit_mib'), '.0f')} | {verdict} |")  # fmt: skip
        out.append("")
    sharding = [r for r in rows if r.get("kind") == "sharding"]
    if sharding:
        out += ["The same images split over processes (OMP_NUM_THREADS each as named); images/s from the manifest "
                "to the last file (the parts merged); overhead: time per image against one process:", "",
                "| setting | contender | images/s | wall s | overhead |", "|---" * 5 + "|"]  # fmt: skip
        for r in sharding:
            if r.get("skipped"):
                out.append(f"| {r.setting} | {r.contender} | | | {r.note} |")
            else:
                note = f" ({r.note})" if r.get("note") else ""
                out.append(f"| {r.setting} | {r.contender} | {r.images_per_s:.1f} | {r.wall_s:.1f} | "
                           f"{r.overhead_pct:+.0f}%{note} |")  # fmt: skip
        out.append("")
    return out


@suite("predict", default=False, table=predict_table, doc="pvt predict over collections vs its ceiling")
def suite_predict(s: Settings) -> None:
    plan = QUICK if s.quick else FULL
    with tempfile.TemporaryDirectory(prefix="pvt-bench-predict-") as tmp:
        root = Path(tmp)
        size = (320, 240) if not s.quick else (plan.classify_px * 5 // 4, plan.classify_px)
        cls_weights = _classifier(root / "classifier", plan.classify_px)
        jpegs = _jpegs(root / "jpegs", plan.classify_images, size)
        setting = f"pvt_v2_b0 classifier {plan.classify_px}px, {plan.classify_images} JPEGs {size[0]}x{size[1]}"
        _grid(s, plan, root, plan.grid, setting, "classification", cls_weights, jpegs, plan.classify_images)
        det_weights = _detector(root / "detector", plan.detect_px)
        scenes = _scenes(root / "scenes", plan.detect_images, plan.detect_px)
        setting = f"shapes RetinaNet (pvt_v2_b0) {plan.detect_px}px, {plan.detect_images} PNG scenes"
        _grid(s, plan, root, plan.detect_grid, setting, "detection", det_weights, scenes, plan.detect_images)
        _sharding(s, plan, root, cls_weights, jpegs, plan.classify_images)
        _memory(s, plan, root)


__all__ = ["FULL", "GOAL_PCT", "QUICK", "Plan", "Run", "best_of", "ceiling", "follow_run", "predict_table",
           "run_predict", "suite_predict"]  # fmt: skip
