"""Non-finite weights and losses: a checkpoint holding NaN / Inf is refused (naming the file and the
tensors) unless explicitly allowed, and a training run whose loss turns NaN stops at that iteration,
on every rank, keeping only the checkpoints written before it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmdet_reference as mref
import pvt
from pvt.checkpoint import CheckpointError, save_safetensors
from pvt.checkpoint.loader import check_finite
from pvt.classification.task import ClassificationTask
from pvt.cli import main as cli_main
from pvt.engine import load_recipe
from pvt.engine.presets import load_preset
from pvt.tasks import get_task

REPO = Path(__file__).resolve().parent.parent
QUICK = ["train.progress=false", "train.log_every=1", "data.eval_batch_size=360"]


def _sets(*items: str) -> list[str]:
    return [arg for item in (*QUICK, *items) for arg in ("--set", item)]


def _poisoned(sd: dict[str, torch.Tensor], *keys: str) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` with a NaN in the first key's tensor and Inf in the others."""
    out = {k: v.clone() for k, v in sd.items()}
    for i, k in enumerate(keys):
        out[k].view(-1)[0] = float("nan") if i == 0 else float("inf")
    return out


def test_check_finite_names_a_few_tensors_and_the_count() -> None:
    sd = {f"w{i}": torch.zeros(4) for i in range(5)} | {"bn.num_batches_tracked": torch.tensor(3)}
    check_finite(sd, "ok.pth")  # finite floats and integer buffers pass
    with pytest.raises(CheckpointError) as e:
        check_finite(_poisoned(sd, "w0", "w1", "w2", "w4"), "bad.pth")
    msg = str(e.value)
    assert msg.startswith("bad.pth: 4 tensor(s) hold NaN or Inf")
    assert "w0 (1 of 4), w1 (1 of 4), w2 (1 of 4) and 1 more" in msg and "w3" not in msg
    assert "allow_nonfinite=True" in msg and "--allow-nonfinite" in msg
    with pytest.raises(CheckpointError, match="h"):  # half precision is checked too
        check_finite({"h": torch.full((2,), float("inf"), dtype=torch.bfloat16)}, "x")


def test_create_model_refuses_nan_weights_unless_allowed(tmp_path: Path) -> None:
    sd = pvt.create_model("pvt_v2_b0", num_classes=10).state_dict()
    path = tmp_path / "diverged.safetensors"
    save_safetensors(_poisoned(sd, "block1.0.attn.q.weight"), path, arch="pvt_v2_b0")
    with pytest.raises(CheckpointError, match=r"diverged\.safetensors: 1 tensor\(s\).*block1\.0\.attn\.q\.weight"):
        pvt.create_model("pvt_v2_b0", num_classes=10, checkpoint=path)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        pvt.load_checkpoint(pvt.create_model("pvt_v2_b0", num_classes=10), path)
    model = pvt.create_model("pvt_v2_b0", num_classes=10, checkpoint=path, allow_nonfinite=True)
    assert torch.isnan(model.state_dict()["block1.0.attn.q.weight"]).any()


def test_cli_eval_refuses_nan_weights_and_allow_nonfinite_loads_them(
    digits_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run folder as the trainer leaves it: its recipe beside its weights (one tensor is NaN).
    task = get_task("classification")
    recipe = load_recipe("classification", task.data_config, load_preset("classification", "digits"),
                         QUICK, model_cls=task.model_config)  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    recipe.dump(run / "config.yaml")
    sd = pvt.create_model("pvt_v2_b0", num_classes=10).state_dict()
    weights = run / "model.safetensors"
    save_safetensors(_poisoned(sd, "head.weight"), weights, arch="pvt_v2_b0")

    assert cli_main(["eval", "classification", "--checkpoint", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pvt eval: error: {weights}: 1 tensor(s) hold NaN or Inf values: head.weight")
    assert "--allow-nonfinite" in err
    assert cli_main(["eval", "classification", "--checkpoint", str(weights), "--allow-nonfinite"]) == 0
    assert '"top1"' in capsys.readouterr().out


def test_whole_detector_with_a_nan_is_refused(tmp_path: Path) -> None:
    sd = _poisoned(mref.state_dict("retinanet_pvtv2_b0"), "bbox_head.retina_cls.weight")
    path = tmp_path / "retina_nan.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"retina_nan\.pth: 1 tensor\(s\).*cls_logits\.weight"):
        pvt.detection.retinanet("pvt_v2_b0", checkpoint=str(path))
    model = pvt.detection.retinanet("pvt_v2_b0", checkpoint=str(path), allow_nonfinite=True)
    assert torch.isnan(model.head.classification_head.cls_logits.weight).any()


def test_whole_semantic_fpn_with_an_inf_is_refused(tmp_path: Path) -> None:
    model = pvt.segmentation.semantic_fpn("pvt_v2_b0", 4, fpn_channels=32, head_channels=16)
    path = tmp_path / "seg_inf.safetensors"
    save_safetensors(_poisoned(model.state_dict(), "head.classifier.weight", "backbone.fpn.inner_blocks.0.0.bias"),
                     path, arch="semantic_fpn_pvt_v2_b0")  # fmt: skip
    build = dict(num_classes=4, fpn_channels=32, head_channels=16, checkpoint=str(path))
    with pytest.raises(CheckpointError, match=r"seg_inf\.safetensors: 2 tensor\(s\)"):
        pvt.segmentation.semantic_fpn("pvt_v2_b0", **build)  # type: ignore[arg-type]
    loaded = pvt.segmentation.semantic_fpn("pvt_v2_b0", allow_nonfinite=True, **build)  # type: ignore[arg-type]
    assert torch.isnan(loaded.state_dict()["head.classifier.weight"]).any()


def test_diverging_run_stops_at_the_iteration_and_keeps_earlier_checkpoints(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_loss = ClassificationTask.loss
    calls = 0

    def loss_nan_at_third(self: ClassificationTask, *args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = real_loss(self, *args)  # type: ignore[arg-type]
        return loss * float("nan") if calls == 3 else loss

    monkeypatch.setattr(ClassificationTask, "loss", loss_nan_at_third)
    run = tmp_path / "run"
    args = ["train", "classification", "--output", str(run),
            *_sets("schedule.iterations=4", "schedule.warmup_iters=1", "data.batch_size=16",
                   "train.checkpoint_every=2")]  # fmt: skip
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("pvt train: error: loss is nan at iteration 3 of 4")
    assert "ckpt_00000002.pt" in err and "--resume" in err
    assert "--set optim.lr=0.0002" in err and "--set optim.clip_grad=1.0" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000002.pt"]
    assert not (run / "model.safetensors").exists()
    saved = torch.load(run / "checkpoints" / "ckpt_00000002.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())

    # The advice works: resume with a lower learning rate and finish.
    monkeypatch.setattr(ClassificationTask, "loss", real_loss)
    assert cli_main([*args, "--resume", "--set", "optim.lr=2e-4"]) == 0
    assert (run / "model.safetensors").is_file()


_WORKER = """
import sys
from pathlib import Path

import torch

from pvt.engine import Trainer, load_recipe
from pvt.engine.presets import load_preset
from pvt.engine.trainer import NonFiniteLoss
from pvt.tasks import get_task
from pvt.classification.task import ClassificationTask

real_loss, calls = ClassificationTask.loss, [0]


def loss(self, model, batch, device):  # NaN on rank 1 only, at its second step
    calls[0] += 1
    out = real_loss(self, model, batch, device)
    return out * float("nan") if calls[0] == 2 and torch.distributed.get_rank() == 1 else out


ClassificationTask.loss = loss
task = get_task("classification")
recipe = load_recipe("classification", task.data_config, load_preset("classification", "digits"), sys.argv[2:],
                     model_cls=task.model_config)
try:
    Trainer(task, recipe, Path(sys.argv[1])).fit()
except NonFiniteLoss as e:
    print(f"rank {torch.distributed.get_rank() if torch.distributed.is_initialized() else '?'}: {e}")
    sys.exit(2)
"""


def test_ddp_every_rank_stops_when_one_rank_diverges(digits_cache: Path, tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_WORKER))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path / "run"), *QUICK, "schedule.iterations=4", "schedule.warmup_iters=1", "data.batch_size=16",
           "train.checkpoint_every=1"]  # fmt: skip
    env = {**os.environ, "PVT_CACHE": str(digits_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # A rank left waiting in a collective would hang: the timeout makes that a failure.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=240)
    assert done.returncode != 0
    out = done.stdout
    assert "iteration 2 of 4" in out, done.stderr[-3000:]
    assert out.count("at iteration 2") == 2  # both ranks stopped at the same step
    assert "NaN or Inf on another process" in out  # rank 0's own loss was finite
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["ckpt_00000001.pt"]


def test_convert_of_a_whole_detector_refuses_nan_unless_allowed(tmp_path: Path, capsys) -> None:
    sd = mref.state_dict("retinanet_pvtv2_b0")
    sd["bbox_head.retina_cls.bias"][3] = float("nan")
    src = tmp_path / "diverged.pth"
    torch.save({"state_dict": sd}, src)
    assert cli_main(["convert", str(src), str(tmp_path / "a.safetensors")]) == 2
    assert f"{src}: 1 tensor(s) hold NaN or Inf" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()
    assert cli_main(["convert", str(src), str(tmp_path / "b.safetensors"), "--allow-nonfinite"]) == 0
