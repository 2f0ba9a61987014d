"""What a crawl records about its rows: the metadata table of a shard and its stats.

The shard format itself (files, tars, manifest, publication) is `pipelines.shards`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.ingest.rows import to_json


def metadata_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (made storable by `ingest.rows.stored_row`) as a table: known columns typed by `schema`,
    extra input columns after them.

    An extra column whose values do not fit one Arrow type that parquet can write (mixed types, an
    empty object) is stored as JSON text, so no value of a row can fail its shard here.
    """
    columns: dict[str, pa.Array] = {}
    for f in schema:
        columns[f.name] = pa.array([r.get(f.name) for r in rows], type=f.type)
    extras: list[str] = []
    for r in rows:
        extras.extend(k for k in r if k not in columns and k not in extras)
    for name in extras:
        values = [r.get(name) for r in rows]
        try:
            column = pa.array(values)
            if pa.types.is_nested(column.type):  # e.g. a struct with no fields: parquet refuses it
                pq.write_table(pa.table({name: column}), pa.MockOutputStream())
        except Exception:  # noqa: BLE001 (ArrowInvalid, OverflowError, ArrowNotImplementedError, ...)
            column = pa.array([None if v is None else to_json(v) for v in values], pa.string())
        columns[name] = column
    return pa.table(columns)


def shard_stats(config_digest: str, metas: list[dict[str, Any]], started: float, **extra: Any) -> dict[str, Any]:
    """A shard's `_stats.json` fields from its rows' metadata (img2dataset's names plus ours)."""
    status = Counter(m["status"] for m in metas)
    return {
        "config_digest": config_digest,
        "count": len(metas),
        "successes": status.get("success", 0),
        "failed_to_download": status.get("failed_to_download", 0),
        **extra,
        "status": dict(sorted(status.items())),
        "retryable": sum(bool(m.get("retryable")) for m in metas),
        "start_time": started,
        "end_time": time.time(),
        "duration": round(time.time() - started, 3),
    }
