"""``pvt plot RUN_DIR``: training curves from ``metrics.jsonl`` as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pvt.utils.files import atomic_write

_NOT_METRICS = {"type", "epoch", "iteration", "count", "img_s"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics yet; train first (pvt train ... --output {run_dir})")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
    return records


def _eval_keys(run: Path, evals: list[dict[str, Any]]) -> list[str]:
    """The metrics worth a line: the run's headline (the keys of its ``final.json``) when written,
    else every summary number; never per-class values (``bbox_ap/circle``), losses, or numbers that
    are negative throughout (COCO's -1 for an area range without objects). A detector's 24 COCO
    numbers made an unreadable legend."""
    final = run / "final.json"
    headline: set[str] | None = None
    if final.is_file():
        try:
            headline = set(json.loads(final.read_text()))
        except json.JSONDecodeError:
            headline = None
    keys = set()
    for r in evals:
        for k, v in r.items():
            if k in _NOT_METRICS or "/" in k or k.endswith("loss") or not isinstance(v, int | float):
                continue
            if (headline is None or k in headline) and any(e.get(k, -1) >= 0 for e in evals):
                keys.add(k)
    return sorted(keys)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, learning rate and evaluation metrics against iteration; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    records = read_metrics(run)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    its = [r["iteration"] for r in train]
    axes[0].plot(its, [r["loss"] for r in train], lw=1)
    axes[0].set(title="training loss", xlabel="iteration", ylabel="loss")
    axes[1].plot(its, [r["lr"] for r in train], lw=1, color="tab:orange")
    axes[1].set(title="learning rate", xlabel="iteration", ylabel="lr")
    keys = _eval_keys(run, evals)
    for k in keys:
        pts = [(r["iteration"], r[k]) for r in evals if k in r]
        axes[2].plot(*zip(*pts, strict=True), marker="o", ms=3, label=k)
    axes[2].set(title="evaluation", xlabel="iteration", ylabel="%")
    if keys:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(run.name)
    dst = Path(out) if out else run / "curves.png"
    atomic_write(dst, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return dst
