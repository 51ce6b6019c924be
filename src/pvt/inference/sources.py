"""What a prediction run reads: image files, folders (recursive), a text file of paths, a COCO json's
``images`` (no annotations needed) and WebDataset-style tar shards, in one deterministic order with
a stable id per image (its path relative to the input root)."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pvt.utils.cache import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Item:
    """One image to predict: ``index`` is its position in the whole run (shards and resumed runs
    keep it), ``id`` its stable name, ``path`` the file (the shard for a tar member)."""

    index: int
    id: str
    path: str
    member: str | None = None  # the member of the tar shard ``path``
    coco_id: int | None = None  # the image's id in a COCO json


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _tar_members(path: Path, shown: str) -> list[tuple[str, str, str]]:
    """(id, shard, member) of every image file in a tar shard, in the shard's own order."""
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar shard ({e})") from e
    return [(f"{shown}/{n}", str(path), n) for n in names]


def _entries(inputs: Iterable[str]) -> list[tuple[str, str, str | None]]:
    """(id, path, tar member) for files, folders and tar shards, in the order given (folders sorted).
    An id is the path relative to the input's root: a folder's files below it, a file's name."""
    out: list[tuple[str, str, str | None]] = []
    for given in inputs:
        p = Path(given)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and (_is_image(f.name) or f.suffix == ".tar"))
            for f in files:
                rel = f.relative_to(p).as_posix()
                if f.suffix == ".tar":
                    out += _tar_members(f, rel)
                else:
                    out.append((rel, str(f), None))
        elif p.is_file() and p.suffix == ".tar":  # its root is its folder: ids start with its name
            out += _tar_members(p, p.name)
        elif p.is_file():
            out.append((p.name, given, None))
        else:
            raise FileNotFoundError(f"{given}: no such image file, folder or tar shard")
    return out


def _coco_entries(coco_json: str, images: str) -> list[tuple[str, str, int]]:
    """(id, path, COCO image id) of every image a COCO json lists (its annotations are not read)."""
    try:
        data = json.loads(Path(coco_json).read_text())
        rows = [(str(im["file_name"]), int(im["id"])) for im in data["images"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{coco_json}: not a COCO json with an 'images' list of file_name / id ({e})") from e
    return [(name, os.path.join(images, name), cid) for name, cid in rows]


def collect(
    inputs: Sequence[str] = (),
    *,
    inputs_from: str | None = None,
    coco_json: str | None = None,
    images: str | None = None,
) -> list[Item]:
    """Every image of a run, indexed in order: ``inputs`` (files, folders, ``.tar`` shards), then
    the paths listed in ``inputs_from`` (one per line, relative to the current folder), then a COCO
    json's images under ``images``. Ids must be unique (an error names the first repeated one)."""
    listed = list(inputs)
    if inputs_from is not None:
        try:
            text = Path(inputs_from).read_text()
        except OSError as e:
            raise ValueError(f"{inputs_from}: cannot read the list of inputs ({e})") from e
        listed += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    rows: list[tuple[str, str, str | None, int | None]] = [(i, p, m, None) for i, p, m in _entries(inputs)]
    rows += [(p, p, None, None) for p in listed[len(inputs) :]]  # a list's paths are their own ids
    if coco_json is not None:
        if images is None:
            raise ValueError("--coco-json needs --images DIR, the folder its file_name values are relative to")
        rows += [(i, p, None, c) for i, p, c in _coco_entries(coco_json, images)]
    elif images is not None:
        raise ValueError("--images goes with --coco-json")
    seen: set[str] = set()
    for row in rows:
        if row[0] in seen:
            raise ValueError(
                f"{row[0]}: given twice (an id is the path below its input's root, a file's name for a file): "
                "pass each image once, or their folder"
            )
        seen.add(row[0])
    if not rows:
        raise FileNotFoundError(f"no images found in {listed or coco_json}")
    return [Item(n, i, p, m, c) for n, (i, p, m, c) in enumerate(rows)]


_OPEN_SHARDS: dict[tuple[int, str], tarfile.TarFile] = {}


def _shard(path: str) -> tarfile.TarFile:
    """An open shard, its member index read once per process (a file offset must not be shared
    with DataLoader workers forked from this process, hence the pid in the key)."""
    key = (os.getpid(), path)
    if key not in _OPEN_SHARDS:
        if len(_OPEN_SHARDS) >= 16:
            _OPEN_SHARDS.pop(next(iter(_OPEN_SHARDS))).close()
        tar = tarfile.open(path)  # noqa: SIM115  (kept open for the process's later reads)
        tar.getmembers()
        _OPEN_SHARDS[key] = tar
    return _OPEN_SHARDS[key]


def read_bytes(item: Item) -> bytes:
    """The encoded image of ``item`` (a file, or a tar shard's member)."""
    if item.member is None:
        return Path(item.path).read_bytes()
    f = _shard(item.path).extractfile(item.member)
    if f is None:
        raise OSError(f"{item.path}: {item.member} is not a regular file")
    return f.read()
