"""``pvt predict --format parquet``: the records as a Parquet file, written row group by row group
through pyarrow. Top-level fields become columns; nested ones (a detector's results, a
segmentation's class shares) are kept as JSON text, so every record fits one schema."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from pvt.utils.files import atomic_write

ROWS_PER_GROUP = 4096


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()}


def _chunks(records: Iterable[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(records)
    while chunk := list(islice(it, n)):
        yield chunk


def write_parquet(records: Iterable[dict[str, Any]], path: Path, rows_per_group: int = ROWS_PER_GROUP) -> Path:
    """Write ``records`` to ``path`` (atomically); the schema comes from the first row group."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError("--format parquet needs pyarrow: pip install 'pvt-vision[inference]'") from e

    def write(tmp: str) -> None:
        writer = None
        schema = None
        for chunk in _chunks(records, rows_per_group):
            rows = [_flat(r) for r in chunk]
            if schema is None:
                schema = pa.Table.from_pylist(rows).schema
                writer = pq.ParquetWriter(tmp, schema)
            assert writer is not None
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        if writer is None:  # no records: an empty file with the one column every record has
            writer = pq.ParquetWriter(tmp, pa.schema([("id", pa.string())]))
        writer.close()

    atomic_write(path, write)
    return path
