"""Planted bad rows: each is its own row's failure or stored by a documented coercion, never its shard's.

Real crawls (real Ray, the loopback web server for images) over inputs of many good rows with every
kind of bad row planted among them, in every input format; the shards are read back with webdataset
and pyarrow, and a rerun resumes without work.
"""

from __future__ import annotations

import datetime
import decimal
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipelines.ingest.images import ImageCrawlConfig, crawl_images
from pipelines.ingest.text import TextCrawlConfig, crawl_text

pytestmark = pytest.mark.usefixtures("ray_cluster")

GOOD = 60  # good rows per input; the bad ones are planted among them
DEEP = "[" * 200_000 + "]" * 200_000  # the parser's recursion limit
LONG = "long " * 700_000  # 3.5 MB: longer than a CSV block, a long line for every format


def strict_json(data: bytes) -> Any:
    """JSON as every other parser reads it: no NaN/Infinity, no lone surrogates, valid UTF-8."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    value = json.loads(data.decode("utf-8"), parse_constant=refuse)
    json.dumps(value).encode("utf-8")
    for s in _strings(value):
        s.encode("utf-8")  # raises on a lone surrogate
    return value


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def plant(good: list[Any], bad: list[Any]) -> list[Any]:
    """The bad rows spread evenly among the good ones (so every shard holds some)."""
    rows, step = [], max(1, len(good) // max(1, len(bad)))
    bad = list(bad)
    for i, row in enumerate(good):
        if i % step == 0 and bad:
            rows.append(bad.pop(0))
        rows.append(row)
    return rows + bad


def read_back(out: Path, result) -> tuple[list[dict], dict[str, dict]]:
    """Every parquet row (each shard read on its own: extra columns may differ in type between shards)
    and every sample, read with webdataset, with its JSON parsed strictly."""
    assert result.ok and result.failed_shards == {}
    names = [s["name"] for s in result.manifest["shards"]]
    rows = [r for n in names for r in pq.read_table(out / f"{n}.parquet").to_pylist()]
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{n}.tar" for n in names]
    samples = {}
    for s in wds.WebDataset([str(out / f"{n}.tar") for n in names], shardshuffle=False, empty_check=False):
        samples[s["__key__"]] = {**s, "json": strict_json(s["json"])}
    assert len(samples) == result.manifest["samples"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    return rows, samples


def check_rerun(config, crawl) -> None:
    """The same command again: every shard is done, nothing is written, nothing fails."""
    again = crawl(config)
    assert again.ok and again.written == 0 and again.skipped == len(again.manifest["shards"])


# -- crawl text: jsonl --------------------------------------------------------------------------
JSONL_BAD = {  # id -> (line, expected status, check of the stored row or None)
    "surrogate-text": ('{"id": "surrogate-text", "text": "lone \\ud800 surrogate"}', "success", None),
    "surrogate-extra": ('{"id": "surrogate-extra", "text": "ok text", "note": "x\\udfffy"}', "success",
                        lambda r: r["note"] == "x\ufffdy"),
    "surrogate-key": ('{"id": "surrogate-key", "text": "ok text", "k\\ud800": 1}', "success",
                      lambda r: r["k\ufffd"] == 1),
    "surrogate-id": ('{"id": "surrogate-id\\udc80", "text": "ok text"}', "success", None),
    "empty-extra": ('{"id": "empty-extra", "text": "ok text", "meta": {}, "tags": []}', "success", None),
    "bigint-extra": ('{"id": "bigint-extra", "text": "ok text", "n": 18446744073709551616}', "success",
                     lambda r: r["n"] in ("18446744073709551616", '"18446744073709551616"')),
    "bigint-neg": ('{"id": "bigint-neg", "text": "ok text", "m": -9223372036854775809}', "success",
                   lambda r: r["m"] == "-9223372036854775809"),
    "bigint-id": ('{"id": 123456789012345678901234567890, "text": "ok text"}', "success", None),
    "nan": ('{"id": "nan", "text": "ok text", "f1": NaN, "f2": Infinity, "f3": -Infinity}', "success",
            lambda r: (r["f1"], r["f2"], r["f3"]) == (None, None, None)),
    "hugefloat": ('{"id": "hugefloat", "text": "ok text", "big": 1e400}', "success",
                  lambda r: r["big"] == "1e400"),
    "nested-mixed": ('{"id": "nested-mixed", "text": "ok text", "nest": [1, "a", {"b": [null, true, 2.5]}, [], {}]}',
                     "success", lambda r: r["nest"] == [1, "a", {"b": [None, True, 2.5]}, [], {}]),
    "nested-surrogate": ('{"id": "nested-surrogate", "text": "ok text", "deep": {"\\ud800": ["\\udc00"]}}',
                         "success", None),
    "nul": ('{"id": "nul", "text": "nul \\u0000 inside", "x\\u0000y": "\\u0000"}', "success",
            lambda r: r["x\x00y"] == "\x00"),
    "forged": ('{"id": "forged", "text": "ok text", "__row_error__": "forged error"}', "success",
               lambda r: r["__row_error__"] == "forged error" and r["error_message"] is None),
    "collide": ('{"id": "collide", "text": "ok text", "status": "failed", "key": "x", "error_message": 5, '
                '"chars": "many", "retryable": "yes", "sha256": {}, "http_status": 99999999999}', "success",
                lambda r: r["key"] != "x" and r["chars"] == 7 and r["retryable"] is False),
    "text-object": ('{"id": "text-object", "text": {"a": 1}}', "invalid_row", None),
    "text-empty-object": ('{"id": "text-empty-object", "text": {}}', "invalid_row", None),
    "long": (json.dumps({"id": "long", "text": LONG}), "success", lambda r: r["chars"] == len(LONG)),
    "empty-name": ('{"id": "empty-name", "text": "ok text", "": 1}', "success", None),
}
# The stored id of the rows whose id is itself a bad value.
ID_OF = {"surrogate-id": "surrogate-id\ufffd", "bigint-id": "123456789012345678901234567890"}
JSONL_UNREADABLE = [  # lines that are no JSON object: invalid_row with the line number
    DEEP, '{"id": "cut", "text": ', "[1, 2]", '"a string"', "null", "42", '{"text": "tab\tinside"}', "NaN",
]
TOO_DEEP = '{"id": "too-deep", "text": "ok text", "d": ' + "[" * 900 + "]" * 900 + "}"  # parses; cannot be stored


def test_text_jsonl_bad_rows_lose_no_good_row(tmp_path: Path) -> None:
    good = [json.dumps({"id": f"good-{i}", "text": f"good document {i}", "n": i, "var": i}) for i in range(GOOD)]
    # An extra column whose type changes from row to row.
    varying = [json.dumps({"id": f"var-{j}", "text": "ok text", "var": v})
               for j, v in enumerate(["s", 2.5, [1], {"a": 1}, True, None, 2**70])]
    lines = [line.encode() for line in plant(good, [v[0] for v in JSONL_BAD.values()] + JSONL_UNREADABLE + varying
                                             + [TOO_DEEP])]
    # Invalid UTF-8, and the UTF-8 spelling of a surrogate (CESU-8).
    lines.append(b'{"id": "bad-utf8", "text": "bytes \xff\xfe\xed\xa0\x80 here"}')
    lines.append(b"{}")
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    config = TextCrawlConfig(input=str(path), output=str(out), shard_size=25, quiet=True)

    result = crawl_text(config)

    rows, samples = read_back(out, result)
    assert len(rows) == len(lines)  # one row per input line, none lost
    by_id = {r["id"]: r for r in rows if r["id"] is not None}
    for i in range(GOOD):  # rows lost to bad rows: 0
        r = by_id[f"good-{i}"]
        assert r["status"] == "success" and samples[r["key"]]["txt"].decode() == f"good document {i}"
        assert samples[r["key"]]["json"]["id"] == f"good-{i}"
    for name, (_, status, check) in JSONL_BAD.items():
        r = by_id[ID_OF.get(name, name)]
        assert r["status"] == status, (name, r)
        if status == "success":
            assert strict_json(json.dumps(samples[r["key"]]["json"]).encode())
            if check:
                assert check(samples[r["key"]]["json"]), (name, samples[r["key"]]["json"])
        else:
            assert r["error_message"] and r["key"] not in samples
            if check:
                assert check(r), (name, r)
    assert samples[by_id["surrogate-text"]["key"]]["txt"].decode() == "lone \ufffd surrogate"
    assert samples[by_id["bad-utf8"]["key"]]["txt"].decode().startswith("bytes \ufffd\ufffd")
    assert all(by_id[f"var-{j}"]["status"] == "success" for j in range(7))
    unreadable = [r for r in rows if r["status"] == "invalid_row" and "malformed JSON" in r["error_message"]]
    assert len(unreadable) == len(JSONL_UNREADABLE) and all(f"{path} line " in r["error_message"] for r in unreadable)
    (too_deep,) = [r for r in rows if r["status"] == "invalid_row" and "nested deeper" in r["error_message"]]
    assert f"line {lines.index(TOO_DEEP.encode()) + 1}" in too_deep["error_message"]
    assert "'d'" in too_deep["error_message"] and too_deep["key"] not in samples
    assert any("RecursionError" in r["error_message"] for r in unreadable)
    assert sum(r["status"] == "empty_text" for r in rows) == 1  # the empty object
    assert not any("forged" in (r["error_message"] or "") for r in rows)
    assert result.manifest["stats"]["total"] == len(lines)

    check_rerun(config, crawl_text)


# -- crawl text: csv, tsv, txt, parquet ----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_text_delimited_bad_rows_lose_no_good_row(tmp_path: Path, fmt: str) -> None:
    sep = "," if fmt == "csv" else "\t"
    header = sep.join(["id", "text", "status", "key", "note"]).encode()
    good = [sep.join([f"good-{i}", f"good document {i}", "x", "y", str(i)]).encode() for i in range(GOOD)]
    bad = [
        sep.join(["bad-utf8", "bytes \xff here", "", "", ""]).encode("latin-1"),  # invalid UTF-8
        sep.join(["surrogate-bytes", "x", "", "", ""]).encode() + b"\xed\xa0\x80",  # UTF-8 spelling of \ud800
        sep.join(["nul", "nul \x00 inside", "", "", "\x00"]).encode(),
        sep.join(["long", LONG, "", "", ""]).encode(),
        sep.join(["few-fields", "x"]).encode(),
        sep.join(["many-fields", "x", "", "", "", "", ""]).encode(),
        sep.join(["quote", 'say "hi" there', "", "", ""]).encode(),
    ]
    path = tmp_path / f"corpus.{fmt}"
    path.write_bytes(header + b"\n" + b"\n".join(plant(good, bad)) + b"\n")
    out = tmp_path / "out"
    config = TextCrawlConfig(input=str(path), output=str(out), shard_size=20, quiet=True)

    result = crawl_text(config)

    rows, samples = read_back(out, result)
    assert len(rows) == GOOD + len(bad)
    by_id = {r["id"]: r for r in rows if r["id"] is not None}
    for i in range(GOOD):
        r = by_id[f"good-{i}"]
        assert r["status"] == "success" and samples[r["key"]]["txt"].decode() == f"good document {i}"
        assert r["note"] == str(i) and r["key"] != "y"  # `status` and `key` columns do not overwrite ours
    assert samples[by_id["bad-utf8"]["key"]]["txt"].decode() == "bytes \ufffd here"
    assert "\ufffd" in by_id["surrogate-bytes"]["note"]
    assert samples[by_id["nul"]["key"]]["txt"].decode() == "nul \x00 inside" and by_id["nul"]["note"] == "\x00"
    assert samples[by_id["long"]["key"]]["txt"].decode() == LONG
    assert by_id["quote"]["status"] == "success"
    failed = [r for r in rows if r["status"] == "invalid_row"]
    assert len(failed) == 2 and all("fields, got" in r["error_message"] for r in failed)

    check_rerun(config, crawl_text)


def test_txt_bad_lines_lose_no_good_line(tmp_path: Path, web) -> None:
    """A txt corpus (crawl text) and a txt URL list (crawl images): one value per line, whatever the bytes."""
    bad = [b"bytes \xff\xfe here", b"cesu \xed\xa0\x80 surrogate", b"nul \x00 inside", LONG.encode(), b"\xff"]
    path = tmp_path / "lines.txt"
    path.write_bytes(b"\n".join(plant([f"good document {i}".encode() for i in range(GOOD)], bad)) + b"\n")
    config = TextCrawlConfig(input=str(path), output=str(tmp_path / "text"), shard_size=20, quiet=True)

    result = crawl_text(config)

    rows, samples = read_back(tmp_path / "text", result)
    assert len(rows) == GOOD + len(bad)
    assert [r for r in rows if r["status"] != "success"] == []
    texts = {s["txt"].decode() for s in samples.values()}
    assert {f"good document {i}" for i in range(GOOD)} <= texts
    assert {"bytes \ufffd\ufffd here", "nul \x00 inside", LONG.strip(), "\ufffd"} <= texts
    check_rerun(config, crawl_text)

    good = [web.url(f"/img/{i % 4}.jpg?good={i}").encode() for i in range(GOOD)]
    bad = [b"http://127.0.0.1/\xff\xfe.jpg", b"http://exa\x00mple.com/x.jpg", b"http://" + b"a" * 300 + b".com/x.jpg",
           b"http://127.0.0.1/" + LONG.encode(), b"\xed\xa0\x80"]
    path = tmp_path / "urls.txt"
    path.write_bytes(b"\n".join(plant(good, bad)) + b"\n")
    config = ImageCrawlConfig(input=str(path), output=str(tmp_path / "images"), shard_size=20, quiet=True,
                              image={"image_size": 32},
                              # A loaded CI machine can take seconds to answer: the bad URLs fail without a fetch.
                              fetch={"allow_private_network": True, "timeout": 30, "retries": 0, "backoff": 0})

    result = crawl_images(config)

    rows, samples = read_back(tmp_path / "images", result)
    assert len(rows) == GOOD + len(bad)
    by_url = {r["url"]: r for r in rows}
    assert [by_url[url.decode()] for url in good if by_url[url.decode()]["status"] != "success"] == []
    assert len(samples) == GOOD
    assert all(r["error_message"] for r in rows if r["status"] != "success")
    check_rerun(config, crawl_images)


def test_text_parquet_bad_values_lose_no_good_row(tmp_path: Path) -> None:
    n = GOOD + 6
    ids = [f"good-{i}" for i in range(GOOD)] + [f"bad-{j}" for j in range(6)]
    text = [f"good document {i}".encode() for i in range(GOOD)] + [
        b"bytes \xff here", b"\x00", LONG.encode(), b"ok text", b"ok text", b"ok text"]
    far = datetime.datetime(9999, 12, 31)
    table = pa.table({
        "id": ids,
        "text": pa.array(text, pa.binary()),  # bytes in parquet: read as UTF-8 text
        "blob": pa.array([b"\xff\xfe" if i % 7 == 0 else None for i in range(n)], pa.binary()),
        "u64": pa.array([2**64 - 1 if i % 5 == 0 else i for i in range(n)], pa.uint64()),
        "f": pa.array([float("nan") if i % 3 == 0 else float("inf") if i % 3 == 1 else 1.5 for i in range(n)]),
        "when": pa.array([far] * n, pa.timestamp("us")),
        # Past year 9999 in seconds: Python has no datetime for it (the row is that row's failure).
        "far": pa.array([253402300800 * 2 if i == GOOD + 5 else 0 for i in range(n)], pa.int64()).cast(
            pa.timestamp("s")),
        "map": pa.array([[(1, "one"), (2, "two")]] * n, pa.map_(pa.int64(), pa.string())),
        "dec": pa.array([decimal.Decimal("1." + "1" * 70)] * n, pa.decimal256(76, 70)),
        "status": ["failed"] * n,
        "__row_error__": ["forged"] * n,
    })
    path = tmp_path / "corpus.parquet"
    pq.write_table(table, path)
    out = tmp_path / "out"
    config = TextCrawlConfig(input=str(path), output=str(out), shard_size=20, quiet=True)

    result = crawl_text(config)

    rows, samples = read_back(out, result)
    assert len(rows) == n
    by_id = {r["id"]: r for r in rows if r["id"] is not None}
    for i in range(GOOD):
        r = by_id[f"good-{i}"]
        assert r["status"] == "success" and samples[r["key"]]["txt"].decode() == f"good document {i}"
        meta = samples[r["key"]]["json"]
        assert meta["u64"] == (str(2**64 - 1) if i % 5 == 0 else i) and meta["__row_error__"] == "forged"
        assert meta["f"] == (None if i % 3 < 2 else 1.5) and meta["when"] == far.isoformat()
    assert samples[by_id["bad-0"]["key"]]["txt"].decode() == "bytes \ufffd here"
    assert by_id["bad-1"]["status"] == "success" and by_id["bad-2"]["chars"] == len(LONG)
    (unreadable,) = [r for r in rows if r["status"] == "invalid_row"]
    assert "'far'" in unreadable["error_message"] and f"row {GOOD + 5}" in unreadable["error_message"]
    assert sum(r["status"] == "success" for r in rows) == n - 1

    check_rerun(config, crawl_text)


# -- crawl images --------------------------------------------------------------------------------
def image_rows(web) -> tuple[list[Any], dict[str, str]]:
    """Good rows and bad ones (as JSON lines), and the status each bad row must end with."""
    good = [json.dumps({"url": web.url(f"/img/{i % 4}.jpg?good={i}"), "caption": f"good {i}", "n": i})
            for i in range(GOOD)]
    u = web.url("/img/0.jpg")
    bad = {
        "caption-surrogate": (f'{{"url": "{u}?b=1", "caption": "lone \\ud800", "tag": "caption-surrogate"}}',
                              "success"),
        "caption-object": (f'{{"url": "{u}?b=2", "caption": {{"a": [1, {{}}]}}, "tag": "caption-object"}}', "success"),
        "extra-bad": (f'{{"url": "{u}?b=3", "caption": "x", "tag": "extra-bad", "e": {{}}, "l": [[], {{}}], '
                      f'"n": 18446744073709551616, "f": NaN, "g": 1e999, "k\\udc00": "\\u0000"}}', "success"),
        "collide": (f'{{"url": "{u}?b=4", "caption": "x", "tag": "collide", "status": "failed", "key": 1, '
                    f'"width": "wide", "retryable": [], "__row_error__": "forged"}}', "success"),
        "url-surrogate": ('{"url": "http://127.0.0.1/\\ud800.jpg", "caption": "x", "tag": "url-surrogate"}', None),
        "url-nul": ('{"url": "http://127.0.0.1/a\\u0000b.jpg", "tag": "url-nul"}', None),
        "url-number": ('{"url": 18446744073709551616, "tag": "url-number"}', "invalid_url"),
        "url-object": ('{"url": {}, "tag": "url-object"}', "invalid_url"),
        "url-long": (json.dumps({"url": "http://127.0.0.1/" + "a" * 200_000, "tag": "url-long"}), None),
        "host-nul": ('{"url": "http://exa\\u0000mple.com/x.jpg", "tag": "host-nul"}', None),
        "host-label": ('{"url": "http://' + "a" * 300 + '.com/x.jpg", "tag": "host-label"}', None),
        "host-surrogate": ('{"url": "http://\\ud800.com/x.jpg", "tag": "host-surrogate"}', None),
    }
    return good, bad


def test_images_bad_rows_lose_no_good_row(tmp_path: Path, web) -> None:
    good, bad = image_rows(web)
    too_deep = '{"url": "' + web.url("/img/0.jpg?b=5") + '", "d": ' + "[" * 900 + "]" * 900 + "}"
    unreadable = [DEEP, '{"url": ', "[]", too_deep]
    lines = [line.encode() for line in plant(good, [line for line, _ in bad.values()] + unreadable)]
    lines += [f'{{"url": "{web.url("/img/2.jpg?b=6")}", "caption": "bytes '.encode() + b'\xff\xfe", "tag": "bytes"}',
              b"{}"]
    path = tmp_path / "urls.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    config = ImageCrawlConfig(input=str(path), output=str(out), shard_size=20, quiet=True,
                              image={"image_size": 32},
                              fetch={"allow_private_network": True, "timeout": 30, "retries": 0, "backoff": 0})

    result = crawl_images(config)

    rows, samples = read_back(out, result)
    assert len(rows) == len(lines)
    by_caption = {r["caption"]: r for r in rows if r["caption"]}
    for i in range(GOOD):  # rows lost to bad rows: 0
        r = by_caption[f"good {i}"]
        assert r["status"] == "success" and samples[r["key"]]["txt"].decode() == f"good {i}"
        assert samples[r["key"]]["json"]["n"] == i and "jpg" in samples[r["key"]]
    by_tag = {r["tag"]: r for r in rows if r.get("tag")}
    for tag, (_, status) in bad.items():
        r = by_tag[tag]
        if status is None:  # the fetcher's to judge; not the shard's failure either way
            assert r["status"] != "success" and r["error_message"], (tag, r)
        else:
            assert r["status"] == status, (tag, r)
        if r["status"] == "success":
            assert samples[r["key"]]["json"]["tag"] == tag
    assert samples[by_tag["caption-surrogate"]["key"]]["txt"].decode() == "lone \ufffd"
    assert json.loads(by_tag["caption-object"]["caption"]) == {"a": [1, {}]}
    extra = samples[by_tag["extra-bad"]["key"]]["json"]
    assert (extra["e"], extra["n"], extra["f"], extra["g"], extra["k\ufffd"]) == (
        {}, "18446744073709551616", None, "1e999", "\x00")
    collide = samples[by_tag["collide"]["key"]]["json"]
    assert collide["status"] == "success" and collide["__row_error__"] == "forged"
    assert collide["key"] == by_tag["collide"]["key"] and collide["width"] == by_tag["collide"]["width"] <= 64
    assert samples[by_tag["bytes"]["key"]]["txt"].decode() == "bytes \ufffd\ufffd"
    failed = [r for r in rows if r["status"] == "invalid_row" and not r.get("tag")]
    assert len(failed) == len(unreadable) and sum("malformed JSON" in r["error_message"] for r in failed) == 3
    assert any("nested deeper" in r["error_message"] for r in failed)
    assert [r["status"] for r in rows if r["status"] == "invalid_url" and r.get("tag") is None] == ["invalid_url"]

    check_rerun(config, crawl_images)


def test_images_csv_bad_rows_lose_no_good_row(tmp_path: Path, web) -> None:
    good = [f"{web.url(f'/img/{i % 4}.jpg?good={i}')},good {i},{i}".encode() for i in range(GOOD)]
    bad = [f"{web.url('/img/1.jpg?b=1')},bytes ".encode() + b"\xff\xfe,x",
           f"{web.url('/img/1.jpg?b=2')},nul \x00,y".encode(),
           f"{web.url('/img/1.jpg?b=3')},{LONG},z".encode(),
           b"http://127.0.0.1/\xff.jpg,bad url bytes,w",
           b"only-one-field"]
    path = tmp_path / "urls.csv"
    path.write_bytes(b"url,caption,key\n" + b"\n".join(plant(good, bad)) + b"\n")
    out = tmp_path / "out"
    config = ImageCrawlConfig(input=str(path), output=str(out), shard_size=20, quiet=True,
                              image={"image_size": 32},
                              fetch={"allow_private_network": True, "timeout": 30, "retries": 0, "backoff": 0})

    result = crawl_images(config)

    rows, samples = read_back(out, result)
    assert len(rows) == GOOD + len(bad)
    captions = {r["caption"]: r for r in rows if r["caption"]}
    for i in range(GOOD):
        r = captions[f"good {i}"]
        assert r["status"] == "success" and samples[r["key"]]["txt"].decode() == f"good {i}"
    assert captions["bytes \ufffd\ufffd"]["status"] == "success"
    assert captions["nul \x00"]["status"] == "success"
    assert captions[LONG]["status"] == "success"
    assert captions["bad url bytes"]["status"] != "success"
    (failed,) = [r for r in rows if r["status"] == "invalid_row"]
    assert "expected 3 fields, got 1" in failed["error_message"]

    check_rerun(config, crawl_images)


# -- the rules and the last line of defence, row by row ------------------------------------------
def test_every_extra_column_is_written_whatever_its_values() -> None:
    from pipelines.ingest.rows import storable_row
    from pipelines.ingest.shards import metadata_table
    from pipelines.ingest.text import METADATA_SCHEMA

    extras = [{"e": {}}, {"e": {}, "l": [{}]}, {"l": [[], {}], "m": 1}, {"m": "one", "big": 2**64},
              {"big": 1, "t": datetime.datetime(2024, 1, 2)}, {"t": "when", "dec": decimal.Decimal("1e-90")}]
    rows = [storable_row({"key": str(i), "status": "success", **e}) for i, e in enumerate(extras)]
    table = metadata_table(rows, METADATA_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    back = pq.read_table(pa.BufferReader(sink.getvalue())).to_pylist()
    assert [json.loads(r["e"]) if r["e"] else None for r in back[:2]] == [{}, {}]
    assert [r["big"] for r in back[3:5]] == ['"18446744073709551616"', "1"]  # mixed types: JSON text


@pytest.mark.parametrize("kind", ["images", "text"])
def test_known_columns_read_from_the_rows_json_are_the_columns_built_from_the_rows(kind: str) -> None:
    """A crawl's shard builds its metadata table from the rows' JSON (no pandas import in the worker): it must be
    the table `pa.array` builds from the rows themselves, for every value a stored row can hold."""
    from pipelines.ingest.rows import stored_row
    from pipelines.ingest.shards import metadata_table
    schema = importlib.import_module(f"pipelines.ingest.{kind}").METADATA_SCHEMA
    texts = ["", "plain", "nul \x00 tab \t newline \n quote \" backslash \\", "lone \ud800 \udfff", "astral \U0001F600",
             "é\u2028\u2029", "\x7f\x1f", "x" * 70000]
    numbers = [0, 1, -1, 2**31 - 1, -2**31, 2**31, 2**63 - 1, -2**63, 2**64]
    floats = [0.0, -0.0, 5e-324, 1e-320, 1.7976931348623157e308, 0.1, 12.345678901234567, float("nan"), float("inf"), 7]
    rows, jsons = [], []
    for i in range(60):
        meta: dict[str, Any] = {"key": f"{i:04d}"}
        for j, f in enumerate(schema):
            if f.name == "key":
                continue
            pick = (i + j) % 9
            if pa.types.is_string(f.type):
                meta[f.name] = None if pick == 0 else texts[(i * 3 + j) % len(texts)]
            elif pa.types.is_integer(f.type):  # in range, but out of range in every fifth row
                fitting = [n for n in numbers if -2 ** (f.type.bit_width - 1) <= n < 2 ** (f.type.bit_width - 1)]
                meta[f.name] = None if pick == 0 else (fitting[(i + 2 * j) % len(fitting)] if i % 5 else 2**64)
            elif pa.types.is_floating(f.type):
                meta[f.name] = None if pick == 0 else floats[(i + j) % len(floats)]
            elif pa.types.is_boolean(f.type):
                meta[f.name] = None if pick == 0 else bool(i % 2)
        if i % 7 == 0:
            meta.update(extra_number=i, extra_text=texts[i % len(texts)], extra_nested={"a": [i, None]})
        row, data = stored_row(meta, schema)
        rows.append(row)
        jsons.append(data)
    assert sum(r["status"] == "invalid_row" for r in rows) not in (0, len(rows))  # both kinds of row are there
    built, read = metadata_table(rows, schema), metadata_table(rows, schema, jsons)
    assert read.schema == built.schema
    assert read.to_pylist() == built.to_pylist()
    for f in schema:  # -0.0 == 0.0 in Python: compare the floats' spellings too
        if pa.types.is_floating(f.type):
            assert [repr(v) for v in read.column(f.name).to_pylist()] == \
                [repr(v) for v in built.column(f.name).to_pylist()]
    assert metadata_table([], schema, []).num_rows == 0


def test_a_crawl_worker_builds_its_metadata_table_without_importing_pandas() -> None:
    """`pa.array` imports pandas on its first call in a process (0.2 s of CPU in each crawl worker); the rows' JSON
    path does not."""
    code = ("import sys\n"
            "from pipelines.ingest.images import METADATA_SCHEMA\n"
            "from pipelines.ingest.rows import stored_row\n"
            "from pipelines.ingest.shards import metadata_table\n"
            "row, data = stored_row({'key': '0', 'url': 'http://a/', 'status': 'success', 'bytes': 3}, METADATA_SCHEMA)\n"
            "table = metadata_table([row], METADATA_SCHEMA, [data])\n"
            "assert table.column('bytes').to_pylist() == [3]\n"
            "print('pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_row_that_still_cannot_be_stored_is_an_invalid_row() -> None:
    from pipelines.ingest.rows import stored_row
    from pipelines.ingest.text import METADATA_SCHEMA

    meta = {f.name: None for f in METADATA_SCHEMA}
    meta.update(key="0001", status="success", http_status=2**40, content_type="text/\udcff", title={"a": 1})
    row, data = stored_row(meta, METADATA_SCHEMA)
    assert (row["key"], row["status"], row["http_status"]) == ("0001", "invalid_row", None)
    assert "'http_status'" in row["error_message"] and row["content_type"] == "text/\ufffd"
    assert strict_json(data) == row
