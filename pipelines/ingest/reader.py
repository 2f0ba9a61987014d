"""Stream rows out of URL lists and corpora (jsonl, csv, tsv, parquet, txt; local or any fsspec URL).

Rows come out in shard-sized lists of dicts, in a fixed order (files sorted by name, rows in file
order), so shard N always holds the same rows and a rerun can skip the shards already written.
Nothing reads a whole file into memory.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.errors import PipelineError
from pipelines.runtime import filesystem

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".txt": "txt"}
# Set on a row whose line could not be parsed; the crawl records it as a failed row.
ROW_ERROR = "__row_error__"


def detect_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if path.endswith(suffix) or path.endswith(suffix + ".gz") or path.endswith(suffix + ".zst"):
            return FORMATS[suffix]
    raise PipelineError(f"{path}: unknown input format (use --input-format jsonl|csv|tsv|parquet|txt)")


def list_input_files(url: str, fmt: str | None = None) -> list[str]:
    """The files of an input: the file itself, or the supported files of a folder, sorted."""
    fs, path = filesystem(url)
    try:
        if fs.isdir(path):
            files = sorted(p for p in fs.find(path) if fmt or any(
                p.endswith(s) or p.endswith(s + ".gz") or p.endswith(s + ".zst") for s in FORMATS))
            if not files:
                raise PipelineError(f"{url}: folder holds no input files ({', '.join(FORMATS)})")
        elif fs.exists(path):
            files = [path]
        else:
            raise PipelineError(f"{url}: no such file or folder")
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"{url}: cannot list input: {exc}") from exc
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return files if protocol in ("file", "local") else [f"{protocol}://{p}" for p in files]


class InputReader:
    """Iterate rows of one or more input files in order, checking the required columns."""

    def __init__(self, url: str, required: list[str], fmt: str | None = None, block_size: int = 1 << 20):
        self.url = url
        self.required = [c for c in required if c]
        self.fmt = fmt
        self.block_size = block_size
        self.files = list_input_files(url, fmt)
        self._check_first_file()

    def _check_first_file(self) -> None:
        """Fail fast, before any cluster work, on an unreadable file, missing columns or no rows."""
        for _ in self.rows():
            return
        raise PipelineError(f"{self.url}: input is empty (no rows)")

    def shards(self, shard_size: int) -> Iterator[list[dict[str, Any]]]:
        """Rows grouped into lists of `shard_size` (the last one shorter)."""
        batch: list[dict[str, Any]] = []
        for row in self.rows():
            batch.append(row)
            if len(batch) == shard_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def rows(self) -> Iterator[dict[str, Any]]:
        for path in self.files:
            yield from self._rows_of(path)

    def _rows_of(self, path: str) -> Iterator[dict[str, Any]]:
        fmt = detect_format(path, self.fmt)
        try:
            yield from getattr(self, f"_rows_{fmt}")(path)
        except PipelineError:
            raise
        except (OSError, pa.ArrowInvalid, UnicodeDecodeError, ValueError) as exc:
            raise PipelineError(f"{path}: cannot read as {fmt}: {exc}") from exc

    def _open(self, path: str):
        fs, p = filesystem(path)
        return fs.open(p, "rb", compression="infer")

    def _check_columns(self, path: str, columns: list[str]) -> None:
        for col in self.required:
            if col not in columns:
                raise PipelineError(f"{path}: column {col!r} not found (columns: {', '.join(columns) or 'none'})")

    def _rows_jsonl(self, path: str) -> Iterator[dict[str, Any]]:
        checked = False
        with self._open(path) as raw:
            for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    yield {ROW_ERROR: f"{path} line {lineno}: malformed JSON ({exc})"}
                    continue
                if not checked:
                    self._check_columns(path, list(row))
                    checked = True
                yield row

    def _rows_delimited(self, path: str, delimiter: str) -> Iterator[dict[str, Any]]:
        with self._open(path) as f:
            # utf-8-sig: spreadsheet exports start with a byte-order mark that is not part of the name.
            header = f.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
        if not header:
            return
        columns = next(csv.reader([header], delimiter=delimiter))
        self._check_columns(path, columns)
        with self._open(path) as f:
            bad: list[dict[str, Any]] = []

            def keep_bad_row(row: Any) -> str:
                where = f"line {row.number}" if row.number is not None else f"row {row.text[:80]!r}"
                bad.append({ROW_ERROR: f"{path} {where}: expected {row.expected_columns} "
                                       f"fields, got {row.actual_columns}"})
                return "skip"

            # Every column as a string: type inference on the first block breaks on a later block.
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(column_names=columns, skip_rows=1, block_size=self.block_size),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter == "\t" else '"',
                                                 newlines_in_values=delimiter != "\t",
                                                 invalid_row_handler=keep_bad_row),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False))
            for batch in reader:
                yield from batch.to_pylist()
                yield from bad  # malformed lines become failed rows, after the block they were in
                bad.clear()

    def _rows_csv(self, path: str) -> Iterator[dict[str, Any]]:
        return self._rows_delimited(path, ",")

    def _rows_tsv(self, path: str) -> Iterator[dict[str, Any]]:
        return self._rows_delimited(path, "\t")

    def _rows_parquet(self, path: str) -> Iterator[dict[str, Any]]:
        with self._open(path) as f:
            pf = pq.ParquetFile(f)
            self._check_columns(path, pf.schema_arrow.names)
            for batch in pf.iter_batches(batch_size=65536):
                yield from batch.to_pylist()

    def _rows_txt(self, path: str) -> Iterator[dict[str, Any]]:
        """One value per line, under the first required column's name (a plain list of URLs)."""
        name = self.required[0] if self.required else "text"
        with self._open(path) as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                if line.strip():
                    yield {name: line.strip()}
