"""Read a shard set as its users do, with `webdataset` and with Hugging Face `datasets`, and check that
what they read is the data: every sample once, each `KEY.json` strict JSON equal to its parquet row
(nulls null, integers integers). Used on every set the curate and end-to-end tests write.

`datasets` infers the types of a webdataset's JSON from the first 5 samples of the first tar, so a field
that is null in those and set later (a page's `date`) fails its load whatever the writer does; the set's
own types (its parquet schema) are given to it instead, as `features`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from datasets import Features, Image, Value, load_dataset

IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")


def strict_json(data: bytes) -> Any:
    """json.loads that refuses NaN and Infinity, which are not JSON (Python's json takes them)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: bare {constant}")

    return json.loads(data, parse_constant=refuse)


def assert_same_row(meta: dict[str, Any], row: dict[str, Any], where: Any) -> None:
    """A sample's metadata is its parquet row: the same fields (one left out is null), the same values
    of the same JSON types (200 is not 200.0)."""
    assert set(meta) <= set(row), (where, sorted(set(meta) - set(row)))
    filled = {k: meta.get(k) for k in row}
    assert json.dumps(filled, sort_keys=True, default=str) == json.dumps(row, sort_keys=True, default=str), \
        (where, filled, row)


def hf_features(folder: Path, manifest: dict[str, Any], exts: set[str]) -> Features:
    """The set's types for `datasets`: its parquet schema for `KEY.json`, its files' kinds for the rest."""
    schema = pa.unify_schemas([pq.read_schema(folder / s["parquet"]) for s in manifest["shards"]],
                              promote_options="permissive")
    files = {ext: Image() if ext in IMAGE_EXTS else Value("string") for ext in sorted(exts - {"json"})}
    return Features({**files, "json": Features.from_arrow_schema(schema.remove_metadata()),
                     "__key__": Value("string"), "__url__": Value("string")})


def assert_loadable(folder: Path, cache_dir: Path) -> int:
    """Load the shard set in `folder` with webdataset and with `load_dataset("webdataset", ...)`; check
    both against the manifest and the parquet files; return the number of samples."""
    manifest = json.loads((folder / "manifest.json").read_text())
    tars = [str(folder / s["tar"]) for s in manifest["shards"]]
    rows = {r["key"]: r for s in manifest["shards"] for r in pq.read_table(folder / s["parquet"]).to_pylist()}
    expected = sum(s["samples"] for s in manifest["shards"])
    assert expected > 0, f"{folder}: no samples to load"

    samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == expected, (folder, len(keys), expected)
    exts: set[str] = set()
    for s in samples:
        meta = strict_json(s["json"])
        assert_same_row(meta, rows[s["__key__"]], folder)
        assert "txt" in s or any(e in s for e in IMAGE_EXTS), (folder, sorted(s))
        exts |= {k for k in s if not k.startswith("__")}

    ds = load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(cache_dir),
                      features=hf_features(folder, manifest, exts))
    assert ds.num_rows == expected and sorted(ds["__key__"]) == sorted(keys), folder
    for key, meta in zip(ds["__key__"], ds["json"], strict=True):
        assert_same_row(meta, rows[key], folder)
    return expected
