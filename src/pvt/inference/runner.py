"""Prediction over whole collections: images decoded and prepared in DataLoader workers, batched
forwards over inputs that share a shape bucket (so a batch computes what one-by-one forwards
would), records streamed out batch by batch, unreadable images recorded and skipped, resumable,
and sharded over torchrun's ranks.

``stream`` is the engine (records as they are made, memory flat); ``run`` adds the run folder
(journals, manifest, resume, merge, derived files), progress and the summary.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import pvt.inference.store as store
from pvt.engine.task import Predictor, Task
from pvt.inference.sources import Item, read_bytes
from pvt.utils.images import ImageError, decode_image

ON_ERROR = ("skip", "stop")
FORMATS = ("jsonl", "parquet")


@dataclass
class Result:
    """One image's outcome: its record, or the reason it could not be predicted."""

    item: Item
    record: dict[str, Any] | None = None
    error: str | None = None
    x: torch.Tensor | None = None  # the prepared input (pictures are drawn over it)
    output: Any = None  # the raw prediction (per-image files are made from it)


class _Prepared(Dataset[tuple[Item, Any, Hashable, str | None]]):
    """Decode and prepare one image (in a DataLoader worker): (item, input, bucket, error)."""

    def __init__(self, items: Sequence[Item], predictor: Predictor) -> None:
        self.items = items
        self.predictor = predictor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Item, Any, Hashable, str | None]:
        item = self.items[i]
        try:
            data = read_bytes(item)
        except OSError as e:
            return item, None, None, f"{item.id}: cannot read the file ({e})"
        try:
            x = self.predictor.prepare(decode_image(data, item.id))
        except ImageError as e:
            return item, None, None, str(e)
        return item, x, self.predictor.group_key(x), None


def _identity(sample: Any) -> Any:
    return sample


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process keeps the cores for the forward


def _stem(item_id: str) -> str:
    """Where an image's files go below the run folder: its id without suffix, kept inside."""
    parts = [p for p in PurePosixPath(item_id).with_suffix("").parts if p not in ("/", ".", "..")]
    return "/".join(parts)


def _display(item: Item) -> str:
    return item.path if item.member is None else f"{item.path}/{item.member}"


def _forward(predictor: Predictor, batch: list[tuple[Item, Any]]) -> list[Result]:
    """One batched forward; if the batch fails, each image alone, so only a bad input fails."""
    try:
        outputs = predictor.forward([x for _, x in batch])
    except (ValueError, RuntimeError) as e:
        if len(batch) == 1:
            return [Result(batch[0][0], error=f"{batch[0][0].id}: the model refused it ({e})")]
        return [r for one in batch for r in _forward(predictor, [one])]
    results = []
    for (item, x), out in zip(batch, outputs, strict=True):
        index = item.coco_id - 1 if item.coco_id is not None else item.index  # record() numbers from 1
        record = {"id": item.id, **predictor.record(_display(item), out, index)}
        results.append(Result(item, record, x=x, output=out))
    return results


def stream(
    predictor: Predictor,
    items: Sequence[Item],
    *,
    batch_size: int = 8,
    workers: int = 0,
    pending: int | None = None,
) -> Iterator[list[Result]]:
    """The results of ``items``, a batch at a time (in the order batches complete). Images are
    decoded and prepared in ``workers`` processes; inputs that share ``predictor.group_key`` are
    batched together up to ``batch_size``; at most ``pending`` prepared inputs wait for
    batch-mates (default 4 batches), so memory stays flat however many images there are."""
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch size {batch_size} and workers {workers}: expected >= 1 and >= 0")
    limit = pending or 4 * batch_size
    loader = DataLoader(
        _Prepared(items, predictor),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        worker_init_fn=_one_thread if workers else None,
        prefetch_factor=max(2, batch_size // max(workers, 1)) if workers else None,
        persistent_workers=False,
    )
    buckets: dict[Hashable, list[tuple[Item, Any]]] = {}
    waiting = 0
    for item, x, key, error in loader:
        if error is not None:
            yield [Result(item, error=error)]
            continue
        bucket = buckets.setdefault(key, [])
        bucket.append((item, x))
        waiting += 1
        if len(bucket) >= batch_size:
            waiting -= len(bucket)
            yield _forward(predictor, buckets.pop(key))
        elif waiting >= limit:  # too many inputs wait: run the fullest bucket as it is
            key = max(buckets, key=lambda k: len(buckets[k]))
            waiting -= len(buckets[key])
            yield _forward(predictor, buckets.pop(key))
    for key in list(buckets):
        yield _forward(predictor, buckets.pop(key))


@dataclass
class Options:
    """How ``run`` predicts and where it writes (``pvt predict``'s flags)."""

    batch_size: int = 8
    workers: int = 2
    out: str | None = None  # the run folder; None: records to stdout
    resume: bool = False
    on_error: str = "skip"  # skip: record it in errors.jsonl and go on; stop: end the run
    format: str = "jsonl"  # parquet: predictions.parquet too, at the end
    save_pictures: bool = False
    progress: bool | None = None  # None: tqdm on a terminal, plain lines otherwise


@dataclass
class Summary:
    images: int = 0  # predicted now
    errors: int = 0  # could not be read now
    skipped: int = 0  # already recorded (resume)
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)  # what the run wrote

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        text = f"{self.images} images, {self.errors} errors, {rate:.1f} images/s, {_clock(self.seconds)}"
        return text + (f" ({self.skipped} already done)" if self.skipped else "")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """images/s and ETA: a tqdm bar on a terminal, a plain line every ``every`` seconds otherwise."""

    def __init__(self, total: int, enabled: bool | None, label: str = "predict", every: float = 10.0) -> None:
        self.total, self.done, self.label, self.every = total, 0, label, every
        self.start = self.last = time.perf_counter()
        self.bar: Any = None
        tty = sys.stderr.isatty()
        if enabled is None:
            enabled = True
        self.enabled = enabled
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="img", file=sys.stderr, smoothing=0.1)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"{self.label}: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {_clock(eta)}",
                  file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Dist:
    """This process's place under torchrun (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)
    total: Callable[[list[int]], list[int]] = field(default=lambda counts: counts)


def torchrun() -> Dist:
    """The torchrun ranks as a ``Dist`` (gloo, CPU collectives only), or one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo")

    def total(counts: list[int]) -> list[int]:
        t = torch.tensor(counts, dtype=torch.int64)
        td.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def barrier() -> None:
        td.barrier()

    return Dist(td.get_rank(), td.get_world_size(), barrier, total)


def run(
    task: Task,
    predictor: Predictor,
    items: Sequence[Item],
    options: Options,
    manifest: dict[str, Any],
    dist: Dist | None = None,
) -> Summary:
    """Predict ``items`` as ``options`` say; the summary counts what this run did (all ranks)."""
    dist = dist or Dist()
    if options.on_error not in ON_ERROR or options.format not in FORMATS:
        raise ValueError(f"--on-error {options.on_error} / --format {options.format}: expected {ON_ERROR} / {FORMATS}")
    out = Path(options.out) if options.out else None
    done = _open_folder(out, options, manifest, dist) if out is not None else set()
    todo = [it for it in items if it.id not in done]
    mine = todo[dist.rank :: dist.world]
    part = None if dist.world == 1 else dist.rank
    predictions = store.Journal(store.journal_path(out, store.PREDICTIONS, part)) if out else None
    errors = store.Journal(store.journal_path(out, store.ERRORS, part)) if out else None
    progress = Progress(len(mine), options.progress, f"predict[{dist.rank}]" if dist.world > 1 else "predict")
    summary = Summary(skipped=len(items) - len(todo))
    start = time.perf_counter()
    try:
        for batch in stream(predictor, mine, batch_size=options.batch_size, workers=options.workers):
            good = [r for r in batch if r.record is not None]
            bad = [{"id": r.item.id, "image": _display(r.item), "error": r.error} for r in batch if r.error]
            if bad and options.on_error == "stop":
                raise ImageError(f"{bad[0]['error']} (--on-error skip records such images and goes on)")
            if out is not None:
                for r in good:
                    stem = _stem(r.item.id)
                    assert r.record is not None and r.x is not None
                    r.record.update(predictor.write_files(out, stem, r.x, r.output, options.save_pictures))
                assert predictions is not None and errors is not None
                predictions.write(r.record for r in good if r.record is not None)
                errors.write(bad)
            else:
                for r in good:
                    print(json.dumps(r.record), flush=True)
                for b in bad:
                    print(f"pvt predict: skipped {b['error']}", file=sys.stderr, flush=True)
            summary.images += len(good)
            summary.errors += len(bad)
            progress.update(len(batch))
    finally:
        progress.close()
        for journal in (predictions, errors):
            if journal is not None:
                journal.close()
    summary.seconds = time.perf_counter() - start
    summary.images, summary.errors = dist.total([summary.images, summary.errors])
    dist.barrier()  # every rank's part is complete
    if out is not None and dist.rank == 0:
        summary.files = [str(p) for p in _finish(task, out, options)]
    return summary


def _open_folder(out: Path, options: Options, manifest: dict[str, Any], dist: Dist) -> set[str]:
    """Check or start the run folder; the ids it already holds (resume)."""
    held = [p.name for k in (store.PREDICTIONS, store.ERRORS) for p in store.journals(out, k)]
    if options.resume:
        store.check_resumable(out, manifest)
        if dist.rank == 0:  # cut torn lines once, before any rank appends
            store.repair_all(out)
        dist.barrier()
        return store.done_ids(out)
    if held:
        raise ValueError(
            f"{out} already holds predictions ({', '.join(held)}): pass --resume to go on, or another --out"
        )
    dist.barrier()  # every rank has looked before rank 0 writes
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        store.write_manifest(out, manifest)
    dist.barrier()
    return set()


def _finish(task: Task, out: Path, options: Options) -> list[Path]:
    """Rank 0, all parts complete: merge them, then the derived files."""
    paths = []
    for kind in (store.PREDICTIONS, store.ERRORS):  # parts of this run, or of an earlier sharded one
        paths.append(store.merge_parts(out, kind))
    records = paths[0]
    paths += task.write_derived(out, store.read_records(records))
    if options.format == "parquet":
        from pvt.inference.parquet import write_parquet

        paths.append(write_parquet(store.read_records(records), out / "predictions.parquet"))
    return paths
