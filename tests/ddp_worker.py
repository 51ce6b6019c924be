"""Run under torchrun by the tests: ``ddp_worker.py OUT TASK PRESET [--set overrides...]`` trains a few
steps and dumps this rank's weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from pvt.engine import Trainer, load_recipe
from pvt.engine.presets import load_preset
from pvt.tasks import get_task

out = Path(sys.argv[1])
name, preset = sys.argv[2], sys.argv[3]
task = get_task(name)
recipe = load_recipe(name, task.data_config, load_preset(name, preset), sys.argv[4:], model_cls=task.model_config)
trainer = Trainer(task, recipe, out / "run")
trainer.fit()
rank = int(os.environ["RANK"])
torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.dist.world_size, "lr": trainer.base_lr}))
