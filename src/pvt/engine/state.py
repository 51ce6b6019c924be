"""Training-state checkpoints: atomic writes, RNG capture, finding the latest one to resume."""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvt.checkpoint import CheckpointError
from pvt.utils.files import atomic_write

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain lists and ints: loadable with
    ``weights_only=True`` and picklable for ``all_gather_object``."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    py_state = random.getstate()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt_{iteration:08d}.pt"


class CheckpointWriteError(OSError):
    """A training checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename): a kill mid-write, or a full disk, leaves the
    previous checkpoint intact and no partial file where a resume would look."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        raise CheckpointWriteError(
            e.errno,
            f"{path.parent}: could not write {path.name} ({e.strerror or e}); the previous checkpoint there is "
            "intact: free space (or fix the folder) and continue with --resume",
        ) from e


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_readable_state(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads, skipping (with a warning naming it) any that does not: a
    node that died while the file system synced can leave a truncated file. None if there are none;
    an error if there are some and none reads."""
    found = list_checkpoints(run_dir)
    problems = []
    for path in reversed(found):
        try:
            return path, load_state(path)
        except RuntimeError as e:
            problems.append(str(e))
            warnings.warn(f"skipping {path}: unreadable ({e.__cause__ or e}); trying the one before", stacklevel=2)
    if found:
        raise CheckpointError(
            f"{run_dir / 'checkpoints'}: no readable checkpoint to resume from: " + "; ".join(problems)
        )
    return None


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"{path}: cannot read this training checkpoint ({e}); delete it to resume from the one before"
        ) from e
    if not isinstance(state, dict) or "iteration" not in state:
        raise RuntimeError(f"{path}: not a pvt-vision training checkpoint")
    return state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
