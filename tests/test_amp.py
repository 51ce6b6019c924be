"""Training precision (``train.amp``): ``auto`` picks bf16 only where the CPU computes it, ``bf16``
without bf16 units warns and trains fp32, the choice is printed and recorded in the run, bf16
autocast keeps fp32 weights and optimizer state, resumes bit-exactly, and its losses follow fp32's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pvt.cli import main as cli_main
from pvt.engine.amp import resolve_amp
from pvt.utils.hardware import CpuInfo

NO_BF16_CPU = CpuInfo("AMD EPYC 7B12", frozenset({"avx2"}))
BF16_CPU = CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))
AMX_CPU = CpuInfo("Intel Xeon Platinum 8481C", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
# The digits preset, tiny: a few steps of batch 16 (bf16 runs emulated on CPUs without bf16 units).
TINY = ["schedule.iterations=4", "schedule.warmup_iters=1", "data.batch_size=16", "data.eval_batch_size=360",
        "train.checkpoint_every=2", "train.deterministic=true", "train.progress=false",
        "train.log_every=1"]  # fmt: skip


def test_auto_picks_bf16_only_where_the_cpu_computes_it() -> None:
    assert resolve_amp("auto", "cpu", NO_BF16_CPU) == ("none", "this CPU (AMD EPYC 7B12) has neither "
                                                               "avx512_bf16 nor amx_bf16")  # fmt: skip
    assert resolve_amp("auto", "cpu", BF16_CPU) == ("bf16", "this CPU (AMD EPYC 9B14) has avx512_bf16")
    assert resolve_amp("auto", "cpu", AMX_CPU)[0] == "bf16" and "amx_bf16" in resolve_amp("auto", "cpu", AMX_CPU)[1]
    assert resolve_amp("bf16", "cpu", BF16_CPU) == ("bf16", "asked for")
    assert resolve_amp("none", "cpu", AMX_CPU) == ("none", "asked for")
    with pytest.warns(UserWarning, match="neither avx512_bf16 nor amx_bf16: bf16 would run emulated"):
        assert resolve_amp("bf16", "cpu", NO_BF16_CPU)[0] == "none"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_amp("fp16", "cpu", AMX_CPU)
    with pytest.raises(ValueError, match="none, bf16, fp16, auto"):
        resolve_amp("fp8", "cpu", AMX_CPU)


def _train(run: Path, *sets: str, resume: bool = False) -> int:
    args = ["train", "classification", "--preset", "digits", "--output", str(run)]
    return cli_main([*args, *[a for s in (*TINY, *sets) for a in ("--set", s)], *(["--resume"] if resume else [])])


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_choice_is_printed_and_recorded(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("pvt.engine.amp.cpu_info", lambda: NO_BF16_CPU)
    assert _train(tmp_path / "auto", "train.amp=auto", "schedule.iterations=1") == 0
    assert "precision: fp32 (train.amp=auto: this CPU (AMD EPYC 7B12) has neither" in capsys.readouterr().out
    run_line = next(r for r in _records(tmp_path / "auto") if r["type"] == "run")
    assert run_line["amp"] == "none" and run_line["amp_asked"] == "auto" and not run_line["resumed"]
    train_lines = [r for r in _records(tmp_path / "auto") if r["type"] == "train"]
    assert train_lines and all(r["data_wait_ms"] >= 0 for r in train_lines)


def test_bf16_autocast_keeps_fp32_state_resumes_bit_exactly_and_follows_fp32(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("pvt.engine.amp.cpu_info", lambda: BF16_CPU)
    ref, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    assert _train(ref, "train.amp=auto") == 0
    assert "precision: bf16 autocast, fp32 weights and optimizer state (train.amp=auto:" in capsys.readouterr().out
    assert _train(fp32, "train.amp=none") == 0
    # Master weights and AdamW's moments stay fp32.
    state = torch.load(ref / "checkpoints" / "ckpt_00000004.pt", weights_only=False)
    assert state["amp"] == "bf16"
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}

    # Resume from the middle checkpoint: the same weights as the uninterrupted run, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    for later in (resumed / "checkpoints").glob("ckpt_00000004.pt"):
        later.unlink()
    (resumed / "model.safetensors").unlink()
    assert _train(resumed, "train.amp=auto", resume=True) == 0
    want, got = load_file(ref / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r for r in _records(resumed) if r["type"] == "run"][-1]["resumed"]

    # bf16's losses follow fp32's, finite, within a bf16-sized tolerance.
    runs = {"bf16": ref, "fp32": fp32}
    losses = {name: [r["loss"] for r in _records(run) if r["type"] == "train"] for name, run in runs.items()}
    assert len(losses["bf16"]) == 4 and all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_bf16_layernorm_and_softmax_keep_fp32_statistics() -> None:
    """Under CPU autocast, LayerNorm and softmax of bf16 activations compute their statistics in
    fp32: the result is fp32 arithmetic on the same bf16 values, rounded once to bf16."""
    torch.manual_seed(0)
    x = (torch.randn(8, 64, 256) * 30 + 100).bfloat16()  # a large mean: bf16 sums would lose it
    w, b = torch.randn(256), torch.randn(256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ln = F.layer_norm(x, (256,), w, b)
        sm = torch.softmax(x / 16, dim=-1)
    want_ln = F.layer_norm(x.float(), (256,), w, b).bfloat16()
    want_sm = torch.softmax(x.float() / 16, dim=-1).bfloat16()
    ulp = 2.0**-7  # bf16's relative spacing
    assert ((ln.float() - want_ln.float()).abs() <= ulp * want_ln.float().abs() + 1e-2).all()
    assert ((sm.float() - want_sm.float()).abs() <= ulp * want_sm.float().abs() + 1e-6).all()
