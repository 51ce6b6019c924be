"""Run by test_classification.py under torchrun: train a few steps, dump this rank's weights."""

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
task = get_task("classification")
recipe = load_recipe("classification", task.data_config, load_preset("classification", "digits"), sys.argv[2:])
trainer = Trainer(task, recipe, out / "run")
trainer.fit()
rank = int(os.environ["RANK"])
torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.dist.world_size, "lr": trainer.base_lr}))
