"""Reading URL lists: formats, folders, shards, malformed lines kept as invalid rows, clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.errors import PipelineError
from pipelines.ingest.reader import InputReader, detect_format
from pipelines.ingest.rows import InvalidRow

ROWS = [{"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "license": "cc-by" if i % 2 else "cc0"}
        for i in range(7)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_delimited(path: Path, rows: list[dict], sep: str) -> Path:
    cols = list(rows[0])
    lines = [sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read(path: Path | str, required=("url",), fmt=None) -> list[dict]:
    return list(InputReader(str(path), list(required), fmt).rows())


def reader_error(path: Path | str, required=("url",), fmt=None) -> str:
    with pytest.raises(PipelineError) as info:
        reader = InputReader(str(path), list(required), fmt)
        list(reader.shards(10))
    return str(info.value)


# -- formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_formats_read_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"list.{fmt}"
    {"jsonl": lambda: write_jsonl(path, ROWS), "csv": lambda: write_delimited(path, ROWS, ","),
     "tsv": lambda: write_delimited(path, ROWS, "\t"), "parquet": lambda: write_parquet(path, ROWS)}[fmt]()
    assert read(path) == ROWS


def test_txt_is_one_url_per_line(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://a/1.jpg\n\n  http://a/2.jpg  \nhttp://a/3.jpg")
    assert read(path) == [{"url": "http://a/1.jpg"}, {"url": "http://a/2.jpg"}, {"url": "http://a/3.jpg"}]


def test_compressed_jsonl(tmp_path):
    path = tmp_path / "list.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    assert read(path) == ROWS


def test_csv_keeps_every_value_a_string(tmp_path):
    # No type inference: it would turn '007' into 7, or break on 'n/a' after 300 integers.
    rows = [{"url": f"http://a/{i}", "id": str(i)} for i in range(300)] + [{"url": "http://a/x", "id": "007"},
                                                                            {"url": "http://a/y", "id": "n/a"}]
    path = write_delimited(tmp_path / "list.csv", rows, ",")
    assert read(path) == rows


def test_csv_quoted_fields_with_commas_and_newlines(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text('url,caption\nhttp://a/1,"a cat, sitting"\n"http://a/2","two\nlines"\nhttp://a/3,""\n')
    assert read(path) == [{"url": "http://a/1", "caption": "a cat, sitting"},
                          {"url": "http://a/2", "caption": "two\nlines"}, {"url": "http://a/3", "caption": ""}]


def test_input_format_overrides_the_extension(tmp_path):
    path = write_jsonl(tmp_path / "list.data", ROWS[:2])
    assert read(path, fmt="jsonl") == ROWS[:2]
    assert "unknown input format" in reader_error(path)


@pytest.mark.parametrize("name, fmt", [("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.csv.gz", "csv"),
                                       ("a.tsv.zst", "tsv"), ("a.parquet", "parquet"), ("s3://b/k/a.txt", "txt")])
def test_detect_format(name, fmt):
    assert detect_format(name, None) == fmt


# -- folders and shards --------------------------------------------------------------------------
def test_folder_is_read_in_sorted_path_order_ignoring_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", ROWS[2:4])
    write_delimited(tmp_path / "a.csv", ROWS[0:2], ",")
    write_parquet(tmp_path / "sub" / "c.parquet", ROWS[4:7])
    (tmp_path / "README.md").write_text("not an input")
    (tmp_path / "_SUCCESS").write_text("")
    assert read(tmp_path) == ROWS


def test_shards_have_n_rows_in_input_order(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ROWS)
    shards = list(InputReader(str(path), ["url"]).shards(3))
    assert [len(s) for s in shards] == [3, 3, 1]
    assert [r for s in shards for r in s] == ROWS


def test_shards_span_file_boundaries(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "b.jsonl", ROWS[5:])
    shards = list(InputReader(str(tmp_path), ["url"]).shards(4))
    assert shards == [ROWS[:4], ROWS[4:]]


def test_shards_are_the_same_on_every_read(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ROWS)
    assert list(InputReader(str(path), ["url"]).shards(2)) == list(InputReader(str(path), ["url"]).shards(2))


# -- malformed rows become invalid rows ----------------------------------------------------------
def test_malformed_json_lines_become_invalid_rows(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + "[1, 2]\n" + json.dumps(ROWS[1]) + "\n\n"
                    + json.dumps(ROWS[2]) + "\n")
    rows = read(path)
    assert [isinstance(r, InvalidRow) for r in rows] == [False, True, True, False, False]
    assert rows[1].reason.startswith(f"{path} line 2: malformed JSON")
    assert rows[2].reason == f"{path} line 3: malformed JSON (not a JSON object)"


def test_malformed_first_json_line_does_not_hide_the_column_check(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("{oops\n" + json.dumps({"link": "http://a/1"}) + "\n")
    error = reader_error(path)
    assert str(path) in error and "'url'" in error


@pytest.mark.parametrize("sep, ext", [(",", "csv"), ("\t", "tsv")])
def test_rows_with_the_wrong_field_count_become_invalid_rows(tmp_path, sep, ext):
    path = tmp_path / f"list.{ext}"
    lines = ["url", "caption"], ["http://a/1", "one"], ["http://a/2", "two", "extra"], ["http://a/3"], \
        ["http://a/4", "four"]
    path.write_text("\n".join(sep.join(line) for line in lines) + "\n")
    rows = read(path)
    assert [r for r in rows if not isinstance(r, InvalidRow)] == [{"url": "http://a/1", "caption": "one"},
                                                                  {"url": "http://a/4", "caption": "four"}]
    errors = [r.reason for r in rows if isinstance(r, InvalidRow)]
    assert len(errors) == 2 and all(e.startswith(str(path)) for e in errors)
    assert sorted(e.rpartition(": ")[2] for e in errors) == ["expected 2 fields, got 1", "expected 2 fields, got 3"]


def test_wrong_field_count_error_names_the_row(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("url,caption\nhttp://a/1,one\nhttp://a/2,two,extra\n")
    (error,) = [r.reason for r in read(path) if isinstance(r, InvalidRow)]
    assert "line 3" in error or "http://a/2" in error


# -- bad rows are that row's problem: stored by a rule or an invalid row, never the input's end --------
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "txt"])
def test_invalid_utf8_becomes_replacement_characters(tmp_path, fmt):
    path = tmp_path / f"list.{fmt}"
    line = {"jsonl": b'{"url": "http://a/\xff\xfe", "n": "\xed\xa0\x80"}', "txt": b"http://a/\xff\xfe"}.get(
        fmt, b"http://a/\xff\xfe" + (b"," if fmt == "csv" else b"\t") + b"\xed\xa0\x80")
    header = {"csv": b"url,n\n", "tsv": b"url\tn\n"}.get(fmt, b"")
    path.write_bytes(header + b"\n".join([line, line.replace(b"\xff\xfe", b"ok")]) + b"\n")
    rows = read(path)
    assert [r["url"] for r in rows] == ["http://a/\ufffd\ufffd", "http://a/ok"]
    assert all(r.get("n", "\ufffd" * 3) == "\ufffd" * 3 for r in rows)  # the UTF-8 spelling of a surrogate


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_rows_longer_than_any_block_and_nul_bytes(tmp_path, fmt):
    sep = "," if fmt == "csv" else "\t"
    long = "x" * 5_000_000
    path = tmp_path / f"list.{fmt}"
    path.write_text(f"url{sep}caption\nhttp://a/1{sep}{long}\nhttp://a/2{sep}nul \x00 byte\nhttp://a/3{sep}c\n")
    assert read(path) == [{"url": "http://a/1", "caption": long}, {"url": "http://a/2", "caption": "nul \x00 byte"},
                          {"url": "http://a/3", "caption": "c"}]


def test_json_lines_unreadable_for_any_reason_are_invalid_rows(tmp_path):
    path = tmp_path / "list.jsonl"
    lines = ["[" * 200_000 + "]" * 200_000, "NaN", "null", '"text"', '{"url": "http://a/1", "x": 1', "\x00"]
    path.write_text("\n".join([json.dumps(ROWS[0])] + lines + [json.dumps(ROWS[1])]) + "\n")
    rows = read(path)
    assert rows[0] == ROWS[0] and rows[-1] == ROWS[1] and len(rows) == len(lines) + 2
    assert all(isinstance(r, InvalidRow) for r in rows[1:-1])
    assert [r.reason.split(":")[0] for r in rows[1:-1]] == [f"{path} line {i}" for i in range(2, len(lines) + 2)]
    assert "RecursionError" in rows[1].reason


def test_input_cannot_forge_an_invalid_row(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [{"url": "http://a/1", "__row_error__": "forged"}])
    assert read(path) == [{"url": "http://a/1", "__row_error__": "forged"}]


def test_json_values_are_made_storable(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"url": "http://a/\\ud800", "big": 18446744073709551616, "small": -9223372036854775808, '
                    '"nan": NaN, "inf": -Infinity, "huge": 1e400, "f": 2.5, "\\udc00": {"1": ["\\ud83d"]}, '
                    '"pair": "\\ud83d\\ude00"}\n'
                    '{"url": "http://a/2", "deep": ' + "[" * 150 + "]" * 150 + "}\n")
    first, deep = read(path)
    assert first == {"url": "http://a/\ufffd", "big": "18446744073709551616", "small": -(2**63), "nan": None,
                     "inf": None, "huge": "1e400", "f": 2.5, "\ufffd": {"1": ["\ufffd"]}, "pair": "\U0001f600"}
    assert isinstance(deep, InvalidRow)
    assert deep.reason == f"{path} line 2: column 'deep': value nested deeper than 100 levels"


def test_empty_first_object_does_not_decide_the_columns(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("{}\n" + json.dumps(ROWS[0]) + "\n")
    assert read(path) == [{}, ROWS[0]]


def test_parquet_values_python_cannot_hold_fail_only_their_row(tmp_path):
    path = tmp_path / "list.parquet"
    seconds = [0, 253402300800 * 2, 0]  # the second is past year 9999
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2", "http://a/3"],
                             "when": pa.array(seconds, pa.int64()).cast(pa.timestamp("s")),
                             "raw": pa.array([b"\xff", b"ok", None], pa.binary()),
                             "u": pa.array([2**64 - 1, 1, None], pa.uint64())}), path)
    first, bad, last = read(path)
    assert first["raw"] == "\ufffd" and first["u"] == str(2**64 - 1) and last["u"] is None
    assert isinstance(bad, InvalidRow) and bad.reason.startswith(f"{path} row 1: column 'when'")


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_missing_column_names_the_file_and_the_column(tmp_path, fmt):
    rows = [{"link": "http://a/1", "caption": "x"}]
    path = tmp_path / f"list.{fmt}"
    {"jsonl": lambda: write_jsonl(path, rows), "csv": lambda: write_delimited(path, rows, ","),
     "tsv": lambda: write_delimited(path, rows, "\t"), "parquet": lambda: write_parquet(path, rows)}[fmt]()
    error = reader_error(path)
    assert error == f"{path}: column 'url' not found (columns: link, caption)"


def test_missing_column_is_reported_when_the_reader_is_made(tmp_path):
    # Before any shard is read, so a crawl fails before it starts a cluster.
    path = write_jsonl(tmp_path / "list.jsonl", [{"link": "http://a/1"}])
    with pytest.raises(PipelineError, match="column 'url' not found"):
        InputReader(str(path), ["url"])


def test_missing_column_in_a_later_file_of_a_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "b.jsonl", [{"link": "http://a/1"}])
    error = reader_error(tmp_path)
    assert str(tmp_path / "b.jsonl") in error and "'url'" in error


def test_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "list.csv"
    path.write_bytes("\ufeffurl,caption\nhttp://a/1,x\n".encode())
    assert read(path) == [{"url": "http://a/1", "caption": "x"}]


@pytest.mark.parametrize("content", ["", "\n\n", "url,caption\n"])
def test_empty_input_is_an_error(tmp_path, content):
    path = tmp_path / ("list.csv" if content.startswith("url") else "list.jsonl")
    path.write_text(content)
    assert reader_error(path) == f"{path}: input is empty (no rows)"


def test_nonexistent_input_is_an_error(tmp_path):
    assert reader_error(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file or folder"


def test_folder_without_input_files_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("x")
    assert "folder holds no input files" in reader_error(tmp_path)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "list.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all PAR1")
    error = reader_error(path)
    assert error.startswith(f"{path}: cannot read as parquet")


def test_corrupt_gzip_names_the_file(tmp_path):
    path = tmp_path / "list.jsonl.gz"
    path.write_bytes(b"this is not gzip data\n")
    error = reader_error(path)
    assert error.startswith(f"{path}: cannot read as jsonl")


def test_unreadable_later_file_of_a_folder_names_it(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.parquet").write_bytes(b"garbage")
    error = reader_error(tmp_path)
    assert error.startswith(f"{tmp_path / 'b.parquet'}: cannot read as parquet")
