"""A prediction run's folder: JSON-lines journals appended and flushed batch by batch, the manifest,
what a killed run left (a torn last line is cut off), and the merge of per-rank part files.

``OUT/predictions.jsonl`` one complete JSON record per line; ``OUT/errors.jsonl`` one line per image
that could not be read; ``OUT/manifest.json`` what produced them. Under torchrun each rank writes
``predictions.part-RANK.jsonl`` / ``errors.part-RANK.jsonl``, merged by rank 0 at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pvt.utils.files import atomic_write

PREDICTIONS = "predictions"
ERRORS = "errors"
MANIFEST = "manifest.json"


def journal_path(out: Path, kind: str, rank: int | None = None) -> Path:
    """``OUT/KIND.jsonl``, or a rank's part ``OUT/KIND.part-RANK.jsonl``."""
    return out / (f"{kind}.jsonl" if rank is None else f"{kind}.part-{rank}.jsonl")


def journals(out: Path, kind: str) -> list[Path]:
    """The merged journal of ``kind`` and every part file, whatever world size wrote them."""
    return [p for p in [journal_path(out, kind), *sorted(out.glob(f"{kind}.part-*.jsonl"))] if p.is_file()]


def repair(path: Path) -> int:
    """Cut off a torn last line (a run killed while writing it); returns the bytes cut."""
    size = path.stat().st_size
    with path.open("rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1  # everything up to the last complete line
        if keep < size:
            f.truncate(keep)
    return size - keep


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of a journal, one at a time (a torn last line is skipped)."""
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            yield json.loads(line)


def repair_all(out: Path) -> None:
    """Cut the torn last line of every journal in ``out`` (merged and parts)."""
    for kind in (PREDICTIONS, ERRORS):
        for path in journals(out, kind):
            repair(path)


def done_ids(out: Path) -> set[str]:
    """Ids already recorded in ``out`` (predictions and errors, merged or in parts)."""
    return {r["id"] for kind in (PREDICTIONS, ERRORS) for path in journals(out, kind) for r in read_records(path)}


class Journal:
    """An append-only JSON-lines file: each ``write`` adds complete lines, flushed to the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        lines = b"".join(json.dumps(r).encode() + b"\n" for r in records)
        if not lines:
            return
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(lines)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def merge_parts(out: Path, kind: str) -> Path:
    """Append every part file of ``kind`` to ``OUT/KIND.jsonl`` (created if absent), then delete
    the parts; a part is deleted only once its lines are on the disk."""
    target = journal_path(out, kind)
    with target.open("ab") as dst:
        for part in sorted(out.glob(f"{kind}.part-*.jsonl")):
            repair(part)
            dst.write(part.read_bytes())
            dst.flush()
            os.fsync(dst.fileno())
            part.unlink()
    return target


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(text))


# What a resumed run must share with the run it continues (a different value would mix two
# models' predictions in one folder).
SAME_ON_RESUME = ("task", "model", "weights_sha256", "precision", "runtime")


def check_resumable(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse to resume ``out`` with another model, weights or precision than its manifest's."""
    path = out / MANIFEST
    if not path.is_file():
        raise ValueError(f"{out}: no {MANIFEST} to resume from; run without --resume (or use another --out)")
    before = json.loads(path.read_text())
    changed = [k for k in SAME_ON_RESUME if before.get(k) != manifest.get(k)]
    if changed:
        what = ", ".join(f"{k} {before.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
        raise ValueError(
            f"{out}: was predicted with another setup ({what}); resume with the same model, weights and "
            "precision, or write to another --out"
        )
