"""File helpers every task's data shares: the cache folder and image inputs."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def cache_dir() -> Path:
    """Where embedded datasets are written on first use (``PVT_CACHE`` overrides)."""
    return Path(os.environ.get("PVT_CACHE", Path.home() / ".cache" / "pvt-vision"))


def expand_inputs(inputs: list[str]) -> list[str]:
    """Image files from a list of files and folders (folders searched recursively, sorted)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    if not out:
        raise FileNotFoundError(f"no images found in {inputs}")
    return out
