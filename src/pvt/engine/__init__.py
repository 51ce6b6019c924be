"""The task-agnostic training engine: recipes and their resolution, optimisation, DDP, checkpoints,
logging, run folders, and the ``Task`` / ``Predictor`` interface every task implements."""

from pvt.engine.config import ConfigError, Recipe, load_recipe
from pvt.engine.recipes import resolve_recipe
from pvt.engine.task import ExportSpec, LoaderConfig, Predictor, Task, WholeModel
from pvt.engine.trainer import Trainer, run_evaluation

__all__ = [
    "ConfigError",
    "ExportSpec",
    "LoaderConfig",
    "Predictor",
    "Recipe",
    "Task",
    "Trainer",
    "WholeModel",
    "load_recipe",
    "resolve_recipe",
    "run_evaluation",
]
