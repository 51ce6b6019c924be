"""The task-agnostic training engine: recipes, optimisation, DDP, checkpoints, logging."""

from pvt.engine.config import ConfigError, Recipe, load_recipe
from pvt.engine.task import LoaderConfig, Task
from pvt.engine.trainer import Trainer, run_evaluation

__all__ = ["ConfigError", "LoaderConfig", "Recipe", "Task", "Trainer", "load_recipe", "run_evaluation"]
