"""The run folder's layout, named once: what ``pvt train`` writes and every later command reads.

``RUN/config.yaml`` (the resolved recipe), ``RUN/task.json`` (the task's artifacts: class names,
...), ``RUN/model.safetensors`` (the final weights), beside ``metrics.jsonl`` and ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RUN_CONFIG = "config.yaml"
ARTIFACTS = "task.json"
WEIGHTS = "model.safetensors"


def run_config_of(weights: str | os.PathLike[str] | None) -> Path | None:
    """The run's ``config.yaml`` beside these weights, if there is one."""
    if weights is None:
        return None
    path = Path(weights).parent / RUN_CONFIG
    return path if path.is_file() else None


def artifacts_of(weights: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The run's ``task.json`` beside these weights (class names, ...), or ``{}``."""
    if weights is None:
        return {}
    path = Path(weights).parent / ARTIFACTS
    return json.loads(path.read_text()) if path.is_file() else {}
