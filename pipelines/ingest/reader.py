"""Stream rows out of URL lists and corpora (jsonl, csv, tsv, parquet, txt; local or any fsspec URL).

Rows come out in shard-sized lists, in a fixed order (files sorted by name, rows in file order),
so shard N always holds the same rows and a rerun can skip the shards already written. Nothing
reads a whole file into memory. Each row is a dict made storable here (`rows.storable_row`: invalid
UTF-8 bytes and lone surrogates become U+FFFD, and so on), or an `InvalidRow` with the reason for a
row that cannot be read or stored: one bad row never stops the input.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import PipelineError
from pipelines.ingest.rows import InvalidRow, UnstorableRow, json_number, storable_row
from pipelines.runtime import filesystem

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".txt": "txt"}
Row = dict[str, Any] | InvalidRow
# One decoder for every line (json.loads with options would build one per call).
_JSON = json.JSONDecoder(parse_float=json_number)


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

    def __init__(self, url: str, required: list[str], fmt: str | None = None):
        self.url = url
        self.required = [c for c in required if c]
        self.fmt = fmt
        self.files = list_input_files(url, fmt)
        self._check_first_file()

    def _check_first_file(self) -> None:
        """Fail fast, before any cluster work, on an unreadable file, missing columns or no rows."""
        for _ in self.rows():
            return
        raise PipelineError(f"{self.url}: input is empty (no rows)")

    def shards(self, shard_size: int) -> Iterator[list[Row]]:
        """Rows grouped into lists of `shard_size` (the last one shorter)."""
        batch: list[Row] = []
        for row in self.rows():
            batch.append(row)
            if len(batch) == shard_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def rows(self) -> Iterator[Row]:
        for path in self.files:
            yield from self._rows_of(path)

    @staticmethod
    def _storable(where: str, row: dict[str, Any]) -> Row:
        """The one point where input rows are made storable (the rules are in `ingest.rows`)."""
        try:
            return storable_row(row)
        except UnstorableRow as exc:
            return InvalidRow(f"{where}: {exc}")
        except Exception as exc:  # noqa: BLE001 - no rule foresaw this value: still only its row
            return InvalidRow(f"{where}: {type(exc).__name__}: {exc}")

    def _rows_of(self, path: str) -> Iterator[Row]:
        fmt = detect_format(path, self.fmt)
        try:
            yield from getattr(self, f"_rows_{fmt}")(path)
        except PipelineError:
            raise
        except (OSError, pa.ArrowInvalid, UnicodeDecodeError, ValueError, EOFError) as exc:
            raise PipelineError(f"{path}: cannot read as {fmt}: {exc}") from exc

    def _open(self, path: str):
        fs, p = filesystem(path)
        return fs.open(p, "rb", compression="infer")

    def _check_columns(self, path: str, columns: list[str]) -> None:
        for col in self.required:
            if col not in columns:
                raise PipelineError(f"{path}: column {col!r} not found (columns: {', '.join(columns) or 'none'})")

    def _rows_jsonl(self, path: str) -> Iterator[Row]:
        checked = False
        with self._open(path) as raw:
            # Invalid UTF-8 becomes U+FFFD; a line that is not one JSON object, for any reason
            # (bad syntax, nesting too deep for the parser), is that row's failure.
            for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace"), 1):
                if not line.strip():
                    continue
                try:
                    row = _JSON.decode(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                except Exception as exc:  # noqa: BLE001 (RecursionError, MemoryError: still one bad line)
                    why = exc if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                    yield InvalidRow(f"{path} line {lineno}: malformed JSON ({why})")
                    continue
                if not checked and row:  # an empty object says nothing about the columns
                    self._check_columns(path, list(row))
                    checked = True
                yield self._storable(f"{path} line {lineno}", row)

    def _rows_delimited(self, path: str, delimiter: str) -> Iterator[Row]:
        # Python's csv module, not pyarrow's reader: that one stops the whole file at one invalid
        # UTF-8 byte or one row longer than its block, where these are one row's problem.
        csv.field_size_limit(sys.maxsize)
        dialect = {"delimiter": delimiter, "quoting": csv.QUOTE_NONE} if delimiter == "\t" else \
            {"delimiter": delimiter, "quotechar": '"', "doublequote": True}
        with self._open(path) as raw:
            # utf-8-sig: spreadsheet exports start with a byte-order mark that is not part of the name.
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
            records = csv.reader(text, **dialect)
            columns = next((r for r in records if r), None)
            if columns is None:
                return
            self._check_columns(path, columns)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield InvalidRow(f"{path} line {records.line_num}: {exc}")
                    continue
                if not record:
                    continue
                if len(record) != len(columns):
                    yield InvalidRow(f"{path} line {records.line_num}: expected {len(columns)} fields, "
                                     f"got {len(record)}")
                    continue
                yield dict(zip(columns, record))  # text decoded with U+FFFD for invalid bytes: storable as it is

    def _rows_csv(self, path: str) -> Iterator[Row]:
        return self._rows_delimited(path, ",")

    def _rows_tsv(self, path: str) -> Iterator[Row]:
        return self._rows_delimited(path, "\t")

    def _rows_parquet(self, path: str) -> Iterator[Row]:
        with self._open(path) as f:
            pf = pq.ParquetFile(f)
            self._check_columns(path, pf.schema_arrow.names)
            first = 0
            for batch in pf.iter_batches(batch_size=65536):
                try:
                    rows = batch.to_pylist()
                except (pa.ArrowException, ValueError, OverflowError):
                    rows = self._rows_one_by_one(path, batch, first)
                for i, row in enumerate(rows, first):
                    yield row if isinstance(row, InvalidRow) else self._storable(f"{path} row {i}", row)
                first += batch.num_rows

    @staticmethod
    def _rows_one_by_one(path: str, batch: pa.RecordBatch, first: int) -> list[Row]:
        """A batch holding a value Python cannot represent (a timestamp past year 9999): row by row."""
        rows: list[Row] = []
        for i in range(batch.num_rows):
            row: Row = {}
            for name, column in zip(batch.schema.names, batch.columns):
                try:
                    row[name] = column[i].as_py()
                except (pa.ArrowException, ValueError, OverflowError) as exc:
                    row = InvalidRow(f"{path} row {first + i}: column {name!r}: {exc}")
                    break
            rows.append(row)
        return rows

    def _rows_txt(self, path: str) -> Iterator[Row]:
        """One value per line, under the first required column's name (a plain list of URLs)."""
        name = self.required[0] if self.required else "text"
        with self._open(path) as raw:
            for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                if line.strip():
                    yield {name: line.strip()}  # decoded with U+FFFD for invalid bytes: storable as it is
