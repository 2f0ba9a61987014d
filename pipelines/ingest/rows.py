"""What a crawled row may hold, and what happens to a row that cannot be stored.

Every input row is made storable once, where it is read (`storable_row`, called by the reader), and
every finished row once more before it is written (`stored_row`), so one bad value costs at most its
own row and never its shard. The rules, applied to names and values at any depth:

- text is valid Unicode: lone surrogates (from `\\ud800` escapes in JSON, or a hostile server's
  bytes) become U+FFFD, as invalid UTF-8 bytes in jsonl/csv/tsv/txt files do where they are read;
- bytes (binary parquet columns) are read as UTF-8 text by the same rule;
- integers outside int64 become their decimal text (`"18446744073709551616"`);
- NaN and ±Infinity become null (JSON has no spelling for them); a JSON number too large for a
  double (`1e400`) keeps its decimal text;
- names that are not text become their JSON text (`1` -> `"1"`, `None` -> `"null"`);
- dates, times and decimals stay typed in the parquet and are ISO 8601 / decimal text in the JSON;
  numpy scalars become plain numbers; any other object becomes its text;
- a column we read as text (URL, caption, id, title) holding anything else is read as its JSON text;
  a document text that is not text makes its row an `invalid_row`;
- a value nested deeper than `MAX_DEPTH` makes its row an `invalid_row`, as does a line that is not
  one JSON object (for any reason, a parser's recursion limit included) or a CSV line with the wrong
  field count.

An input column named like one of our metadata fields (`status`, `key`, ...) is not carried: ours
win. An extra column whose values share no Arrow type that parquet can write (mixed types, an empty
object) is stored as JSON text (`metadata_table`). A row that still cannot be written becomes an
`invalid_row` holding only our metadata fields, with the reason. A row that cannot be read arrives as
an `InvalidRow` object, a marker no input can spell.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

MAX_DEPTH = 100
INT64 = (-(2**63), 2**63 - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class InvalidRow:
    """Stands in for an input row that could not be read (a bad JSON line, a wrong field count)."""

    reason: str


class UnstorableRow(ValueError):
    """A row that no coercion can store (nested too deeply)."""


def valid_text(s: str) -> str:
    """`s` with every lone surrogate replaced by U+FFFD (it cannot be encoded as UTF-8)."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", s)
    return s


def json_number(text: str) -> float | str:
    """A JSON number with a fraction or exponent: a double, or its text if no double holds it."""
    value = float(text)
    return value if math.isfinite(value) else text


def storable_value(value: Any, depth: int = 0) -> Any:
    """`value` coerced by the rules of this module (raises `UnstorableRow` if it is nested too deeply)."""
    kind = type(value)  # the common types first, by identity: this runs for every value of every row
    if kind is str:
        return valid_text(value)
    if kind is int:
        return value if INT64[0] <= value <= INT64[1] else str(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if value is None or kind is bool:
        return value
    if isinstance(value, (dict, list, tuple)):
        if depth >= MAX_DEPTH:
            raise UnstorableRow(f"value nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            return {storable_key(k): storable_value(v, depth + 1) for k, v in value.items()}
        return [storable_value(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal)):
        return value
    if isinstance(value, str):  # subclasses (enums)
        return valid_text(str(value))
    if isinstance(value, numbers.Integral):  # subclasses and numpy scalars: as the plain type
        return storable_value(int(value))
    if isinstance(value, numbers.Real):
        return storable_value(float(value))
    return valid_text(str(value))


def storable_key(key: Any) -> str:
    if type(key) is str:
        return valid_text(key)
    return text_of(key)


def storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row with storable names and values (raises `UnstorableRow` naming the column)."""
    out = {}
    for k, v in row.items():
        name = storable_key(k)
        try:
            out[name] = storable_value(v)
        except UnstorableRow as exc:
            raise UnstorableRow(f"column {name!r}: {exc}") from None
    return out


def json_default(value: Any) -> Any:
    """JSON for the typed values a storable row may keep (dates, times, decimals)."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


# One encoder for every row (json.dumps with options would build one per call).
_ENCODER = json.JSONEncoder(default=json_default, allow_nan=False)


def to_json(value: Any) -> str:
    """JSON text of a storable value (always valid JSON: no NaN, no lone surrogates)."""
    return _ENCODER.encode(value)


def text_of(value: Any) -> str | None:
    """A value we read as text (a URL, caption, id, title): strings as they are, others as JSON text."""
    if value is None or isinstance(value, str):
        return value
    return to_json(storable_value(value))


def _type_check(type_: pa.DataType) -> Callable[[Any], bool]:
    """Whether a value other than None fits `type_`, as a function (built once per schema field: the checks run for
    every field of every row)."""
    if pa.types.is_string(type_):
        return lambda value: isinstance(value, str)
    if pa.types.is_boolean(type_):
        return lambda value: isinstance(value, bool)
    if pa.types.is_integer(type_):
        bound = 2 ** (type_.bit_width - 1)
        return lambda value: isinstance(value, int) and not isinstance(value, bool) and -bound <= value < bound
    if pa.types.is_floating(type_):
        return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)

    def scalar_fits(value: Any) -> bool:
        try:
            pa.scalar(value, type_)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False
        return True

    return scalar_fits


# The checks of each schema seen, by identity: hashing a pa.Schema (what an lru_cache would do) takes 7 µs, as
# long as the rest of `stored_row`, which runs for every row of a crawl. The schema is kept, so its id stays its own.
_CHECKS: dict[int, tuple[pa.Schema, tuple[tuple[str, pa.DataType, Callable[[Any], bool]], ...]]] = {}


def _field_checks(schema: pa.Schema) -> tuple[tuple[str, pa.DataType, Callable[[Any], bool]], ...]:
    known = _CHECKS.get(id(schema))
    if known is None or known[0] is not schema:
        if len(_CHECKS) >= 64:
            _CHECKS.clear()
        known = _CHECKS[id(schema)] = (schema, tuple((f.name, f.type, _type_check(f.type)) for f in schema))
    return known[1]


def invalid_row(meta: dict[str, Any], schema: pa.Schema, reason: str) -> dict[str, Any]:
    """The row recorded for `meta` when it cannot be stored: our metadata fields only, with the reason."""
    bare = {}
    for name, _, fits in _field_checks(schema):
        try:
            value = storable_value(meta.get(name))  # a NaN would fail the JSON, a lone surrogate the parquet
        except UnstorableRow:
            value = None
        bare[name] = value if value is None or fits(value) else None
    bare.update(status="invalid_row", error_message=valid_text(reason), retryable=False)
    return bare


def stored_row(meta: dict[str, Any], schema: pa.Schema) -> tuple[dict[str, Any], bytes]:
    """A finished row as it will be stored, and its sample's JSON.

    The last line of defence: the row is made storable once more (fetch results and extracted
    text come from servers), its metadata fields are checked against `schema`, and its JSON is
    written here; a row that still fails any of this is returned as an `invalid_row`.
    """
    try:
        row = storable_row(meta)
        wrong = [f"{name!r} is {type(row[name]).__name__}, not {type_}"
                 for name, type_, fits in _field_checks(schema) if row.get(name) is not None and not fits(row[name])]
        if wrong:
            raise UnstorableRow("; ".join(wrong))
        return row, to_json(row).encode()
    except Exception as exc:  # one row that cannot be stored must not fail its shard
        row = invalid_row(meta, schema, f"cannot store row: {type(exc).__name__}: {exc}")
        return row, to_json(row).encode()
