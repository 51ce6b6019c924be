"""Preset recipes shipped in ``pvt/configs/<task>/<name>.yaml``, or any YAML file path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pvt.engine.config import ConfigError, read_yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def list_presets(task: str) -> list[str]:
    d = PRESET_DIR / task
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_preset(task: str, name_or_path: str) -> dict[str, Any]:
    """A shipped preset by name, or a recipe YAML (e.g. a run's ``config.yaml``) by path."""
    path = Path(name_or_path)
    # A name is a shipped preset unless it looks like a recipe file or names an existing *file*:
    # a folder called like a preset (a previous --output digits) must not shadow it.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        data = read_yaml(path)
    else:
        shipped = PRESET_DIR / task / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ConfigError(
                f"unknown {task} preset {name_or_path!r}; choose one of {list_presets(task)} or pass a YAML path"
            )
        data = read_yaml(shipped)
    if "task" in data and data["task"] != task:
        raise ConfigError(f"{name_or_path}: a {data['task']} recipe, not {task}")
    return data
