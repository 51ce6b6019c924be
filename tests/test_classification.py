"""The classification task end to end: a short run, exact resume after SIGKILL, two-process DDP,
evaluation and prediction from the CLI, and clear errors for bad data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pvt
from pvt.classification import CheckedImageFolder, DataError
from pvt.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
# Small, fast settings on the embedded digits preset.
QUICK = ["train.progress=false", "train.log_every=1", "data.eval_batch_size=360"]


def _env(digits_cache: Path) -> dict[str, str]:
    return {**os.environ, "PVT_CACHE": str(digits_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _sets(*items: str) -> list[str]:
    return [arg for item in (*QUICK, *items) for arg in ("--set", item)]


def test_digits_export(digits_cache: Path) -> None:
    root = digits_cache / "digits"
    train = CheckedImageFolder(root / "train")
    val = CheckedImageFolder(root / "val", classes=train.classes)
    assert train.classes == [str(i) for i in range(10)]
    assert (len(train), len(val)) == (1437, 360)
    assert Image.open(train.samples[0][0]).size == (8, 8)


def test_short_run_then_eval_predict_plot(
    digits_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", "classification", "--preset", "digits", "--output", str(run)]
    assert cli_main([*args, *_sets("schedule.iterations=6", "schedule.warmup_iters=1", "data.batch_size=64")]) == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "model.safetensors",
        "final.json",
        "task.json",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("ckpt_*.pt"))
    final = json.loads((run / "final.json").read_text())
    assert set(final) >= {"top1", "top5"} and 0 <= final["top1"] <= 100
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["type"] == "eval"
    # Re-running into the same folder without --resume is refused (nothing is overwritten).
    assert cli_main([*args, *_sets("schedule.iterations=6")]) == 2
    assert "--resume" in capsys.readouterr().err

    capsys.readouterr()
    assert cli_main(["eval", "classification", "--checkpoint", str(run / "model.safetensors")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(final["top1"], abs=1e-3)

    image = next((digits_cache / "digits" / "val" / "3").iterdir())
    out = tmp_path / "pred"
    assert cli_main(["predict", "classification", "--checkpoint", str(run / "model.safetensors"),
                     "--out", str(out), str(image)]) == 0  # fmt: skip
    (pred,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert pred["image"] == str(image) and len(pred["top5"]) == 5
    assert {p["label"] for p in pred["top5"]} <= {str(i) for i in range(10)}
    assert cli_main(["predict", "classification", "--checkpoint", str(run / "model.safetensors"), str(image)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == pred  # without --out: to stdout


def test_bf16_ema_accumulation_and_freezing(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_amp import BF16_CPU

    monkeypatch.setattr("pvt.engine.amp.cpu_info", lambda: BF16_CPU)  # bf16 autocast, even here
    run = tmp_path / "opts"
    sets = _sets("schedule.iterations=3", "schedule.warmup_iters=1", "data.batch_size=16", "train.amp=bf16",
                 "train.ema_decay=0.9", "optim.accum_steps=2", "model.freeze_stages=1", "optim.clip_grad=1.0",
                 "train.grad_checkpointing=true")  # fmt: skip
    assert cli_main(["train", "classification", "--output", str(run), *sets]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert {"top1", "ema_top1"} <= set(records[-1])
    # The frozen first stage keeps its init (the trainer seeds with train.seed=0); the rest trained.
    weights = load_file(run / "model.safetensors")
    torch.manual_seed(0)
    init = pvt.create_model("pvt_v2_b0", num_classes=10, drop_path_rate=0.1).state_dict()
    assert torch.equal(weights["patch_embed1.proj.weight"], init["patch_embed1.proj.weight"])
    assert torch.equal(weights["block1.0.attn.q.weight"], init["block1.0.attn.q.weight"])
    assert not torch.equal(weights["block2.0.attn.q.weight"], init["block2.0.attn.q.weight"])


def _train_cmd(run: Path, *extra: str) -> list[str]:
    sets = _sets("schedule.iterations=16", "schedule.warmup_iters=2", "train.checkpoint_every=4",
                 "train.deterministic=true", "data.batch_size=96", "data.mixup=0.5")  # fmt: skip
    return [sys.executable, "-m", "pvt.cli", "train", "classification", "--preset", "digits",
            "--output", str(run), *sets, *extra]  # fmt: skip


def test_exact_resume_after_sigkill(digits_cache: Path, tmp_path: Path) -> None:
    env = _env(digits_cache)
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref), env=env, check=True, capture_output=True, cwd=REPO, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run / "checkpoints" / "ckpt_00000008.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # mid-epoch (14 steps per epoch), no chance to clean up
    proc.wait()
    assert not (run / "model.safetensors").exists()
    subprocess.run(_train_cmd(run, "--resume"), env=env, check=True, capture_output=True, cwd=REPO, timeout=600)

    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((ref / "final.json").read_text()) == json.loads((run / "final.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    timing = {"img_s", "data_wait_ms"}  # measured, not computed: they differ between any two runs
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs if r["type"] != "run"]  # noqa: E731
    assert strip(lines) == strip(ref_lines)  # no duplicated or missing records
    # One "run" line per start: the resumed run says where it picked up.
    starts = [(r["iteration"], r["resumed"]) for r in lines if r["type"] == "run"]
    assert [(r["iteration"], r["resumed"]) for r in ref_lines if r["type"] == "run"] == [(0, False)]
    assert starts == [(0, False), (8, True)]


def test_sigterm_checkpoints_and_exits(digits_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "term"
    proc = subprocess.Popen(
        _train_cmd(run, "--set", "schedule.iterations=200"),
        env=_env(digits_cache),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = run / "checkpoints" / "ckpt_00000004.pt"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: checkpointed iteration" in out and "--resume" in out
    saved = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    stopped_at = int(out.split("checkpointed iteration ")[1].split(";")[0])
    assert saved[-1].name == f"ckpt_{stopped_at:08d}.pt"
    assert torch.load(saved[-1], weights_only=True)["iteration"] == stopped_at


def test_two_process_ddp_trains_in_step(digits_cache: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), str(tmp_path), "classification", "digits", *QUICK,
           "schedule.iterations=4", "schedule.warmup_iters=1", "data.batch_size=32",
           "train.progress=false"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(digits_cache), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    info = json.loads((tmp_path / "rank0.json").read_text())
    assert info["world"] == 2
    assert info["lr"] == pytest.approx(2e-3 * (2 * 32) / 64)  # scaled by the total batch over base_batch
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]  # rank 0 alone logs
    assert (tmp_path / "run" / "model.safetensors").is_file()


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_bad_data_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found"):
        CheckedImageFolder(tmp_path / "nope")
    empty = _image_folder(tmp_path / "a", {"cat": 2, "dog": 0})
    with pytest.raises(DataError, match=r"a/dog: empty class folder"):
        CheckedImageFolder(empty)
    train = _image_folder(tmp_path / "b" / "train", {"cat": 2, "dog": 2})
    val = _image_folder(tmp_path / "b" / "val", {"cat": 2, "cow": 2})
    with pytest.raises(DataError, match=r"extra \['cow'\], missing \['dog'\]"):
        CheckedImageFolder(val, classes=CheckedImageFolder(train).classes)
    bad = train / "dog" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = CheckedImageFolder(train)
    idx = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match=f"{bad}: cannot read this image.*data.skip_bad=true"):
        ds[idx]
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        skipped = CheckedImageFolder(train, skip_bad=True)
    assert len(skipped) == 4 and skipped.skipped == 1


def test_cli_reports_bad_recipe_and_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r")
    assert cli_main(["train", "classification", "--preset", "nope", "--output", out]) == 2
    assert "unknown classification preset 'nope'" in capsys.readouterr().err
    assert cli_main(["train", "classification", "--preset", "pvt_tiny", "--output", out]) == 2
    assert "data.root is not set" in capsys.readouterr().err
    assert cli_main(["train", "classification", "--output", out, "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err
