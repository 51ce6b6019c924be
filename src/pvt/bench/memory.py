"""The ``memory`` suite (not in the default run: a leak check, not a comparison): trains the
digits preset for 200 iterations in a fresh process, as ``pvt train`` does, and checks its
resident memory grows by less than ``MEMORY_BOUND_PCT`` from the end of the first epoch to the end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from pvt.bench.harness import Row, Settings, suite
from pvt.runtime import malloc as runtime

MEMORY_BOUND_PCT = 5.0  # the bound on RSS growth after the first epoch


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

    from pvt.classification import ClassificationTask
    from pvt.engine import Trainer, load_recipe
    from pvt.engine.presets import load_preset

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


def growth_pct(epoch1_mib: float, end_mib: float) -> float:
    """Resident memory growth from the end of the first epoch to the end, in %."""
    return 100 * (end_mib / epoch1_mib - 1)


def memory_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    out = ["Resident memory (VmRSS) of `pvt train` in a fresh process, after the first epoch (its evaluation "
           f"and checkpoint included) and at the end; a leak check, bound {MEMORY_BOUND_PCT:g}%:", "",
           "| setting | ms / iteration | RSS after epoch 1 (MiB) | RSS at end (MiB) | growth | result |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        growth = growth_pct(r.rss_epoch1_mib, r.rss_end_mib)
        verdict = "pass" if growth < MEMORY_BOUND_PCT else "FAIL"
        out.append(
            f"| {r.setting} | {r.ms:.0f} | {r.rss_epoch1_mib:.0f} | {r.rss_end_mib:.0f} | {growth:+.1f}% | {verdict} |"
        )
    return [*out, ""]


_TRAIN_RSS_SNIPPET = """
import json, torch
torch.set_num_threads({threads})
from pvt.bench.memory import train_rss
print(json.dumps(train_rss({iterations}, {overrides!r})))
"""


@suite("memory", default=False, table=memory_table, needs="train", doc="a leak check")
def memory(s: Settings) -> None:
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
                      rss_epoch1_mib=m["epoch1_mib"], rss_end_mib=m["end_mib"],
                      growth_pct=growth_pct(m["epoch1_mib"], m["end_mib"])))  # fmt: skip


__all__ = ["MEMORY_BOUND_PCT", "growth_pct", "memory", "memory_table", "train_rss"]
