"""The benchmark machinery on tiny inputs: twins checked, every suite's rows, the report and plots.
(Speed itself is measured by `pvt bench`, never asserted in tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pvt.bench.harness import Row, alternate
from pvt.bench.report import report

pytest.importorskip("timm")
pytest.importorskip("transformers")


def test_alternate_rotates_and_takes_medians() -> None:
    calls: list[str] = []
    out = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"] and set(out) == {"a", "b"}


def test_twins_disagreeing_are_refused() -> None:
    from pvt.bench.peers import check_twins, timm_twins

    ours, peer = timm_twins("pvt_v2_b0")
    x = torch.randn(1, 3, 64, 64)
    assert check_twins(ours, peer, x) < 1e-5
    with torch.no_grad():
        ours.head.bias.add_(1.0)
    with pytest.raises(AssertionError, match="the twins disagree"):
        check_twins(ours, peer, x)


def test_report_speedups() -> None:
    rows = [Row("classify", "s", "pvt-vision", 10.0, 3, gmacs=1.0), Row("classify", "s", "timm", 25.0, 3, gmacs=1.0)]
    text = report(rows, {"cpu": "x"}, peaks={"fp32": 400.0})
    assert "| s | timm | 25.0 | 2.50x | 80.0 | 20% |" in text and "| s | pvt-vision | 10.0 |  | 200.0 | 50% |" in text


def test_quick_run_writes_results_and_plots(digits_cache: Path, tmp_path: Path) -> None:
    from pvt.cli import main

    assert main(["bench", "--quick", "--repeats", "1", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    suites = {"classify", "train", "dense", "scaling", "precision", "accuracy"}
    assert {r["suite"] for r in data["rows"]} == suites
    assert all(r["ms"] > 0 for r in data["rows"]) and data["matmul_peak_gflops"] > 0
    assert {r["contender"] for r in data["rows"] if r["suite"] == "classify"} == {
        "pvt-vision",
        "timm",
        "HF transformers",
    }
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## scaling" in text and "MiB" in text and "fp32 GEMM peak" in text
    assert (tmp_path / "scaling.png").stat().st_size > 0 and (tmp_path / "speedups.png").stat().st_size > 0


def test_memory_table_verdicts() -> None:
    rows = [
        Row("memory", "a", "pvt-vision", 100.0, 200, rss_epoch1_mib=800.0, rss_end_mib=820.0),
        Row("memory", "b", "pvt-vision", 100.0, 200, rss_epoch1_mib=800.0, rss_end_mib=880.0),
    ]
    text = report(rows, {"cpu": "x"}, peaks={"fp32": 400.0})
    assert "| a | 100 | 800 | 820 | +2.5% | pass |" in text and "| b | 100 | 800 | 880 | +10.0% | FAIL |" in text


def test_memory_suite_quick(digits_cache: Path, tmp_path: Path) -> None:
    """The leak check's machinery on 8 iterations at batch 256 (5 per epoch): a fresh training
    process's RSS sampled after the first epoch and at the end, growth and verdict reported."""
    from pvt.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--quick", "--suites", "memory", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = [Row(**r) for r in json.loads((tmp_path / "results.json").read_text())["rows"]]
    assert row.suite == "memory" and row.repeats == 8 and "(5 per epoch)" in row.setting and row.ms > 0
    assert row.rss_epoch1_mib is not None and row.rss_end_mib is not None and row.growth_pct is not None
    assert 100 < row.rss_epoch1_mib < 16384 and 100 < row.rss_end_mib < 16384  # a real training process
    assert row.growth_pct == pytest.approx(100 * (row.rss_end_mib - row.rss_epoch1_mib) / row.rss_epoch1_mib)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## memory" in text and f"| {row.setting} | {row.ms:.0f} | {row.rss_epoch1_mib:.0f} |" in text


def test_predict_suite_quick(tmp_path: Path) -> None:
    """The predict suite's machinery on tiny inputs: `pvt predict --out` subprocesses over a
    classifier's JPEGs and the shapes RetinaNet's scenes beside their ceilings, the memory run's
    peaks, torchrun beside one process (Ray is left out of --quick), and the report's summaries."""
    from pvt.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--quick", "--suites", "predict", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [Row(**r) for r in json.loads((tmp_path / "results.json").read_text())["rows"]]
    assert {r.suite for r in rows} == {"predict"}
    assert {r.kind for r in rows} == {"ceiling", "predict", "memory", "sharding"}
    measured = [r for r in rows if not r.get("skipped")]
    assert all(r.ms > 0 and r.images_per_s > 0 and r.ms == pytest.approx(1e3 / r.images_per_s) for r in measured)
    runs = {(r.setting.split()[0], r.workers, r.batch): r for r in rows if r.kind == "predict"}
    assert set(runs) == {("pvt_v2_b0", 0, 1), ("pvt_v2_b0", 2, 8), ("shapes", 2, 8)}
    assert all(r.images in (40, 16) and r.wall_s > r.first_s > 0 and r.steady_images_per_s > 0 for r in runs.values())
    assert {r.batch for r in rows if r.kind == "ceiling"} == {1, 8}
    (memory,) = [r for r in rows if r.kind == "memory"]
    assert memory.images == 400 and 100 <= memory.first <= memory.last < 400
    assert 50 < memory.rss_first_mib <= memory.rss_end_mib <= memory.rss_exit_mib < 16384
    assert memory.all_end_mib > memory.rss_end_mib
    sharding = {r.contender: r for r in rows if r.kind == "sharding"}
    assert sharding["torchrun, 2 processes x 1 thread"].images == 40
    assert sharding["--engine ray --actors 2"].skipped and "--quick" in sharding["--engine ray --actors 2"].note
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## predict" in text and text.count("best `--workers") == 2 and "% of the ceiling (goal 85%: " in text
    assert "x one at a time (the ceiling's measurements, images/s: batch 1: " in text
    assert "| memory: pvt_v2_b0 classifier 64px, 400 JPEGs | --workers 2 --batch-size 8 |" in text
