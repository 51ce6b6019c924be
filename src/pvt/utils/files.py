"""File helpers every layer uses: atomic writes of any file, PNG pictures."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers never see a partial file."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(picture: Any, path: str | os.PathLike[str]) -> None:
    """Write a PIL image as PNG, atomically."""
    atomic_write(path, lambda tmp: picture.save(tmp, "PNG"))
