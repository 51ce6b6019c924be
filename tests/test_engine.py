"""Engine pieces: recipes, schedules, parameter groups, sampling, checkpoints and RNG state."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import pvt
from pvt.classification import ClassificationData
from pvt.engine import ConfigError, load_recipe
from pvt.engine.config import OptimConfig, ScheduleConfig
from pvt.engine.data import ResumableSampler, SeededDataset
from pvt.engine.optim import Schedule, param_groups, scaled_lr
from pvt.engine.state import (
    checkpoint_path,
    latest_checkpoint,
    load_state,
    prune_checkpoints,
    rng_state,
    save_state,
    set_rng_state,
)


def test_recipe_defaults_preset_and_overrides() -> None:
    preset = {"optim": {"lr": 1e-3}, "data": {"batch_size": 8, "scale": [0.5, 1.0]}}
    sets = ["optim.lr=2e-4", "schedule.epochs=3", "data.auto_augment=null", "optim.clip_grad=1"]
    r = load_recipe("classification", ClassificationData, preset, sets)
    assert r.optim.lr == 2e-4 and isinstance(r.optim.lr, float)
    assert r.optim.clip_grad == 1.0 and isinstance(r.optim.clip_grad, float)
    assert r.schedule.epochs == 3 and r.data.batch_size == 8 and r.data.auto_augment is None
    assert r.data.scale == (0.5, 1.0)
    assert r.to_dict()["optim"]["lr"] == 2e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"optim: unknown key\(s\) \['lrr'\]; valid keys: .*'lr'"),
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["optim.lr"], "expected KEY=VALUE"),
        (["lr=1"], "keys start with one of"),
        (["train.amp=fp8"], "train.amp must be none, bf16, fp16 or auto"),
        (["data.scale=[1, 2, 3]"], "data.scale: expected 2 values"),
        (["schedule.name=linear"], "schedule.name"),
    ],
)
def test_recipe_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe("classification", ClassificationData, {}, overrides)


def test_recipe_dump_roundtrip(tmp_path: Path) -> None:
    from pvt.engine.config import read_yaml

    r = load_recipe("classification", ClassificationData, {}, ["optim.lr=3e-4", "data.root=/data/x"])
    r.dump(tmp_path / "config.yaml")
    again = load_recipe("classification", ClassificationData, read_yaml(tmp_path / "config.yaml"))
    assert again == r


def test_lr_scaling_rule() -> None:
    assert scaled_lr(OptimConfig(lr=5e-4, base_batch=512), 1024) == pytest.approx(1e-3)
    assert scaled_lr(OptimConfig(lr=5e-4, base_batch=512, scale_lr=False), 1024) == 5e-4


def test_warmup_then_cosine() -> None:
    s = Schedule(ScheduleConfig(name="cosine", warmup_iters=10, warmup_lr=1e-6, min_lr=1e-5), 1e-3, 110, 10)
    assert s.lr_at(0) == pytest.approx(1e-6)
    assert s.lr_at(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s.lr_at(110) == pytest.approx(1e-5)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_poly_and_step_schedules() -> None:
    poly = Schedule(ScheduleConfig(name="poly", warmup_iters=0, power=0.9, min_lr=0.0), 2e-4, 100, 10)
    assert poly.lr_at(0) == pytest.approx(2e-4)
    assert poly.lr_at(50) == pytest.approx(2e-4 * 0.5**0.9)
    assert poly.lr_at(100) == 0.0
    # mmdet 1x: 500-iteration linear warmup, x0.1 at epochs 8 and 11.
    step = Schedule(ScheduleConfig(name="step", epochs=12, warmup_iters=500, warmup_lr=1e-7, milestones=[8, 11]),
                    1e-4, 12 * 1000, 1000)  # fmt: skip
    assert step.lr_at(499) < 1e-4
    assert step.lr_at(7999) == pytest.approx(1e-4)
    assert step.lr_at(8000) == pytest.approx(1e-5)
    assert step.lr_at(11000) == pytest.approx(1e-6)


def test_schedule_state_roundtrip() -> None:
    a = Schedule(ScheduleConfig(), 1e-3, 100, 10)
    for _ in range(37):
        a.step()
    b = Schedule(ScheduleConfig(), 1e-3, 100, 10)
    b.load_state_dict(a.state_dict())
    assert b.iteration == 37 and b.lr_at(b.iteration) == a.lr_at(a.iteration)


def test_no_decay_groups_and_lr_multipliers() -> None:
    model = pvt.create_model("pvt_tiny")
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}  # type: ignore[attr-defined]
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}  # type: ignore[attr-defined]
    assert {
        "cls_token",
        "pos_embed1",
        "pos_embed4",
        "norm.weight",
        "head.bias",
        "block1.0.norm1.weight",
    } <= no_decay
    assert {
        "head.weight",
        "block1.0.attn.q.weight",
        "patch_embed1.proj.weight",
        "block1.0.attn.sr.weight",
    } <= decay
    assert not no_decay & decay and len(no_decay | decay) == len(names)

    groups = param_groups(model, OptimConfig(backbone_lr_mult=0.1, layer_decay=0.5))
    mult = {names[id(p)]: g["lr_mult"] for g in groups for p in g["params"]}  # type: ignore[attr-defined]
    assert mult["head.weight"] == 1.0
    assert mult["block4.0.attn.q.weight"] == pytest.approx(0.1 * 0.5)
    assert mult["patch_embed1.proj.weight"] == pytest.approx(0.1 * 0.5**4)
    assert mult["cls_token"] == pytest.approx(0.1 * 0.5)


def test_frozen_parameters_are_left_out() -> None:
    model = pvt.create_model("pvt_v2_b0")
    model.freeze_stages(2)
    params = [p for g in param_groups(model, OptimConfig()) for p in g["params"]]  # type: ignore[attr-defined]
    assert len(params) == sum(p.requires_grad for p in model.parameters())


def test_sampler_resumes_mid_epoch_and_shards() -> None:
    s = ResumableSampler(10, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new order each epoch
    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    shards = [[i for i, _ in r] for r in ranks]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    repeated = ResumableSampler(8, seed=0, repeats=3)
    assert len(list(repeated)) == 8


def test_aspect_ratio_grouped_batches() -> None:
    groups = [i % 3 == 0 for i in range(30)]
    s = ResumableSampler(30, seed=1, groups=[int(g) for g in groups], batch_size=4)
    s.set_epoch(0)
    order = [i for i, _ in s]
    assert sorted(order) == list(range(30))
    full = [order[k : k + 4] for k in range(0, 28, 4)]
    mixed = [b for b in full if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the leftovers at the end may mix
    s.set_epoch(0, start=8)
    assert [i for i, _ in s] == order[8:]


def test_seeded_dataset_is_deterministic_and_leaves_rng_alone() -> None:
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[float, float, float]:
            return random.random(), float(np.random.rand()), torch.rand(()).item()

    ds = SeededDataset(Noisy())
    torch.manual_seed(0)
    before = torch.rand(())
    torch.manual_seed(0)
    a, b = ds[(1, 42)], ds[(1, 42)]
    assert a == b and ds[(1, 43)] != a
    assert torch.rand(()) == before  # the caller's stream did not move
    # A batch (the loader's path) holds the items fetched one by one, and moves no stream either.
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), torch.rand(()).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert ds.__getitems__([(1, 42), (1, 43), (3, 42)]) == [a, ds[(1, 43)], ds[(3, 42)]]
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == expected
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, sampler=[(0, 7), (2, 8)])))
    assert [x.tolist() for x in batch] == [list(v) for v in zip(ds[(0, 7)], ds[(2, 8)], strict=True)]


def test_rng_state_roundtrip() -> None:
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint_path(tmp_path, 10)
    save_state(path, {"iteration": 10, "w": torch.ones(3)})

    def broken_save(obj: object, f: str) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, {"iteration": 20})
    monkeypatch.undo()
    assert load_state(path)["iteration"] == 10  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_latest_checkpoint_and_pruning(tmp_path: Path) -> None:
    for it in (5, 10, 15):
        save_state(checkpoint_path(tmp_path, it), {"iteration": it})
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 15)
    prune_checkpoints(tmp_path, keep=2)
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 15)
    assert not checkpoint_path(tmp_path, 5).exists()
    checkpoint_path(tmp_path, 20).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="delete it to resume from the one before"):
        load_state(checkpoint_path(tmp_path, 20))


def test_cosine_matches_closed_form() -> None:
    s = Schedule(ScheduleConfig(warmup_iters=0, min_lr=0.0), 1.0, 4, 1)
    assert [round(s.lr_at(i), 6) for i in range(5)] == [
        round(0.5 * (1 + math.cos(math.pi * i / 4)), 6) for i in range(5)
    ]


def test_curves_plot_the_headline_metrics_only(tmp_path: Path) -> None:
    """A detector logs 24 COCO numbers and per-class AP; the curves show the run's headline."""
    from pvt.engine.plot import _eval_keys

    evals = [{"type": "eval", "epoch": 0, "iteration": 10, "bbox_ap": 1.0, "bbox_ap50": 2.0, "bbox_ap_l": -100.0,
              "bbox_ap/circle": 3.0, "segm_ap": 1.5, "val_loss": 0.3}]  # fmt: skip
    assert _eval_keys(tmp_path, evals) == ["bbox_ap", "bbox_ap50", "segm_ap"]  # no final.json: summary numbers
    (tmp_path / "final.json").write_text(json.dumps({"bbox_ap": 1.0, "segm_ap": 1.5, "iterations": 10}))
    assert _eval_keys(tmp_path, evals) == ["bbox_ap", "segm_ap"]
