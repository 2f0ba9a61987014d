"""What a crawl records about its rows: the metadata table of a shard and its stats.

The shard format itself (files, tars, manifest, publication) is `pipelines.shards`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from pipelines.ingest.rows import to_json


def metadata_table(rows: list[dict[str, Any]], schema: pa.Schema, jsons: list[bytes] | None = None) -> pa.Table:
    """Rows (made storable by `ingest.rows.stored_row`) as a table: known columns typed by `schema`,
    extra input columns after them.

    `jsons`, the JSON text of each row as `stored_row` wrote it, if the caller has it: the known columns are
    then read from it by Arrow's JSON reader instead of being built from Python lists. `pa.array` imports
    pandas the first time it runs in a process (it looks for pandas types in its input), which costs a crawl's
    worker 0.2 s of CPU; the JSON reader never does.

    An extra column whose values do not fit one Arrow type that parquet can write (mixed types, an
    empty object) is stored as JSON text, so no value of a row can fail its shard here.
    """
    columns: dict[str, pa.Array] = {}
    known = _known_columns(jsons, schema) if jsons is not None and rows else None
    for f in schema:
        columns[f.name] = known.column(f.name) if known is not None else \
            pa.array([r.get(f.name) for r in rows], type=f.type)
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


def _known_columns(jsons: list[bytes], schema: pa.Schema) -> pa.Table | None:
    """The `schema` columns of rows given as JSON objects, one per row; None where the JSON reader does not take
    them (a block of over 1 GiB; a value not of its field's type, which `stored_row` never lets through), for
    `pa.array` to build them instead."""
    data = b"\n".join(jsons)
    if len(data) >= 1 << 30:
        return None
    try:
        table = pj.read_json(pa.BufferReader(data),
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
                             parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore",
                                                           newlines_in_values=False))
    except pa.ArrowException:
        return None
    return table.combine_chunks() if table.num_rows == len(jsons) else None


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
