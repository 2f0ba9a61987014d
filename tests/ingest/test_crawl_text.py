"""`pipelines crawl text` end to end: corpora from files, and web pages from a real local HTTP server."""

from __future__ import annotations

import glob
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.errors import PipelineError
from pipelines.ingest.fetch import FetchConfig
from pipelines.ingest.text import TextCrawlConfig, crawl_text

pytestmark = pytest.mark.usefixtures("ray_cluster")

NAV = ('<nav><ul><li><a href="/">Home</a></li><li><a href="/news">News desk</a></li>'
       '<li><a href="/about">About us</a></li></ul></nav>')
FOOTER = "<footer><p>Copyright 2024 Example Media Group. All rights reserved. Imprint and privacy policy.</p></footer>"

RIVERS = [
    "The river valley has been shaped over thousands of years by seasonal floods that carry fine silt from the "
    "mountains down to the plains, where farmers have long relied on the fertile soil for wheat and barley.",
    "Engineers who studied the old embankments found that medieval builders used layers of clay and willow "
    "branches, a technique that absorbed the pressure of rising water better than the concrete walls added later.",
    "Today the regional authority is restoring wetlands along both banks, giving the water room to spread out "
    "during storms and creating habitat for herons, otters and dozens of species of dragonfly.",
]
BERGE = [
    "Die Alpen entstanden vor rund hundert Millionen Jahren, als die afrikanische Platte gegen die europäische "
    "drückte und die Gesteinsschichten zu gewaltigen Falten auftürmte, die bis heute langsam weiter wachsen.",
    "Gletscher haben die Täler in den Eiszeiten zu breiten Trögen ausgeschliffen; die Seen am Rand der Berge "
    "füllen die Becken, die das Eis beim Rückzug hinterlassen hat, und speisen die großen Flüsse Europas.",
    "Wer heute durch die Hochtäler wandert, sieht, wie schnell sich die Gletscherzungen zurückziehen, und "
    "Forschende messen jedes Jahr, wie viele Meter Eis der warme Sommer wieder gekostet hat.",
]


def article(lang: str, title: str, paragraphs: list[str], published: str | None = None) -> bytes:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    date = f'<meta property="article:published_time" content="{published}">' if published else ""
    return (f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title>{date}</head>'
            f"<body>{NAV}<main><article><h1>{title}</h1>{body}</article></main>{FOOTER}</body></html>").encode()


class Site:
    """A small web site on 127.0.0.1: articles, a 404, an opt-out, a robots.txt ban, non-HTML, a flaky page."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.flaky_down = True
        self.pages: dict[str, tuple[int, dict[str, str], bytes]] = {
            "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n"),
            "/rivers.html": (200, {"Content-Type": "text/html; charset=utf-8"},
                             article("en", "How the River Shaped the Valley", RIVERS, "2023-04-05")),
            "/berge.html": (200, {"Content-Type": "text/html"}, article("de", "Wie die Alpen entstanden", BERGE)),
            "/noai.html": (200, {"Content-Type": "text/html", "X-Robots-Tag": "noai"},
                           article("en", "Not for training", RIVERS)),
            "/private/secret.html": (200, {"Content-Type": "text/html"}, article("en", "Secret", RIVERS)),
            "/data.json": (200, {"Content-Type": "application/json"}, b'{"not": "a page"}'),
            "/notes.txt": (200, {"Content-Type": "text/plain; charset=utf-8"}, "Plain notes, über alles.\n".encode()),
            "/blank.html": (200, {"Content-Type": "text/html"},
                            b'<html><head><title>Gallery</title></head><body><img src="a.png"></body></html>'),
            "/flaky.html": (200, {"Content-Type": "text/html"}, article("en", "Back again", RIVERS)),
        }

    def respond(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.hits[path] = self.hits.get(path, 0) + 1
        if path == "/flaky.html" and self.flaky_down:
            return 503, {"Content-Type": "text/plain"}, b"down for maintenance"
        return self.pages.get(path, (404, {"Content-Type": "text/plain"}, b"not found"))


@pytest.fixture
def site() -> Iterator[tuple[str, Site]]:
    state = Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = state.respond(self.path)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def local_fetch() -> FetchConfig:
    return FetchConfig(allow_private_network=True, retries=0, timeout=5, backoff=0)


def read_rows(output: Path) -> list[dict[str, Any]]:
    tables = [pq.read_table(p) for p in sorted(glob.glob(str(output / "*.parquet")))]
    return pa.concat_tables(tables, promote_options="default").to_pylist()


def read_samples(output: Path) -> dict[str, dict[str, Any]]:
    """Samples read back with webdataset, as key -> {"txt": str, "json": dict}."""
    urls = sorted(glob.glob(str(output / "*.tar")))
    return {s["__key__"]: {"txt": s["txt"].decode(), "json": json.loads(s["json"])}
            for s in wds.WebDataset(urls, shardshuffle=False)}


def test_jsonl_corpus_into_shards(tmp_path: Path) -> None:
    lines = [json.dumps({"id": 7, "text": "The first document, long enough.", "source": "web"}),
             json.dumps({"id": 8, "text": "", "source": "web"}),
             "{not json",
             json.dumps({"id": 9, "text": "tiny", "source": "books"}),
             json.dumps({"id": 10, "text": "Ein zweites Dokument mit Umlauten: äöü.", "source": "books",
                         "language": "de"})]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    result = crawl_text(TextCrawlConfig(input=str(tmp_path / "corpus.jsonl"), output=str(out), shard_size=2,
                                        min_chars=10, quiet=True))

    assert result.ok and result.manifest["kind"] == "text"
    assert [s["name"] for s in result.manifest["shards"]] == ["00000", "00001", "00002"]
    rows = read_rows(out)
    assert [(r["key"], r["id"], r["status"]) for r in rows] == [
        ("000000", "7", "success"), ("000001", "8", "empty_text"), ("000010", None, "invalid_row"),
        ("000011", "9", "filtered"), ("000020", "10", "success")]
    assert "malformed JSON" in rows[2]["error_message"] and "line 3" in rows[2]["error_message"]
    assert rows[3]["chars"] == 4 and "min_chars=10" in rows[3]["error_message"]
    assert [r["source"] for r in rows] == ["web", "web", None, "books", "books"]
    assert rows[4]["language"] == "de"

    samples = read_samples(out)
    assert set(samples) == {"000000", "000020"}
    assert samples["000020"]["txt"] == "Ein zweites Dokument mit Umlauten: äöü."
    meta = samples["000000"]["json"]
    assert meta["id"] == "7" and meta["source"] == "web" and meta["chars"] == len("The first document, long enough.")
    assert meta["sha256"] == rows[0]["sha256"] and len(meta["sha256"]) == 64
    assert result.manifest["samples"] == 2 and result.manifest["stats"]["status"]["success"] == 2


def test_rerun_on_a_changed_corpus_is_refused_and_overwrite_starts_over(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"

    def write(ids: range) -> None:
        corpus.write_text("".join(json.dumps({"id": i, "text": f"document number {i}"}) + "\n" for i in ids))

    write(range(5))
    config = TextCrawlConfig(input=str(corpus), output=str(tmp_path / "out"), shard_size=2, quiet=True)
    crawl_text(config)
    write(range(1, 6))  # one document dropped at the start, one added at the end: every shard shifts
    with pytest.raises(PipelineError, match=f"^{config.output}: shard 00000 was made from other input rows"):
        crawl_text(config)
    assert [r["id"] for r in read_rows(tmp_path / "out")] == ["0", "1", "2", "3", "4"]

    result = crawl_text(config.model_copy(update={"overwrite": True}))
    assert result.ok and [r["id"] for r in read_rows(tmp_path / "out")] == ["1", "2", "3", "4", "5"]


def test_parquet_corpus_with_named_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "content": ["alpha text", None, "gamma text"],
                             "url": ["https://example.org/a", None, "https://example.org/c"],
                             "score": [0.5, 0.1, 0.9]}), tmp_path / "corpus.parquet")
    out = tmp_path / "out"

    result = crawl_text(TextCrawlConfig(input=str(tmp_path / "corpus.parquet"), output=str(out), text_col="content",
                                        id_col="doc_id", quiet=True))

    assert result.ok
    rows = read_rows(out)
    assert [(r["id"], r["status"], r["url"], r["score"]) for r in rows] == [
        ("a", "success", "https://example.org/a", 0.5), ("b", "empty_text", None, 0.1),
        ("c", "success", "https://example.org/c", 0.9)]
    assert "content" not in rows[0] and "doc_id" not in rows[0]
    assert {k: s["txt"] for k, s in read_samples(out).items()} == {"00000000": "alpha text", "00000002": "gamma text"}


def test_txt_corpus_is_one_document_per_line(tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("first line document\n\nsecond line document\n")
    out = tmp_path / "out"

    result = crawl_text(TextCrawlConfig(input=str(tmp_path / "lines.txt"), output=str(out), quiet=True))

    assert result.ok
    rows = read_rows(out)
    assert [(r["id"], r["status"]) for r in rows] == [(None, "success"), (None, "success")]
    assert [s["txt"] for _, s in sorted(read_samples(out).items())] == ["first line document", "second line document"]


def test_explicit_id_column_must_exist(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": "no id here"}) + "\n")
    with pytest.raises(PipelineError, match="column 'doc_id' not found"):
        crawl_text(TextCrawlConfig(input=str(tmp_path / "corpus.jsonl"), output=str(tmp_path / "out"),
                                   id_col="doc_id", quiet=True))


def test_web_pages_fetched_politely_and_extracted(tmp_path: Path, site: tuple[str, Site]) -> None:
    base, state = site
    paths = ["/rivers.html", "/berge.html", "/missing.html", "/noai.html", "/private/secret.html", "/data.json",
             "/notes.txt", "/blank.html", "ftp://example.org/file", "/flaky.html"]
    urls = [p if "://" in p else base + p for p in paths]
    (tmp_path / "urls.jsonl").write_text(
        "".join(json.dumps({"url": u, "id": f"doc{i}", "topic": "test"}) + "\n" for i, u in enumerate(urls)))
    out = tmp_path / "out"
    config = TextCrawlConfig(input=str(tmp_path / "urls.jsonl"), output=str(out), source="urls", shard_size=4,
                             fetch=local_fetch(), quiet=True)

    result = crawl_text(config)

    assert result.ok
    rows = {r["url"]: r for r in read_rows(out)}
    assert [rows[u]["status"] for u in urls] == [
        "success", "success", "failed_to_download", "skipped_opt_out", "skipped_robots", "not_html",
        "success", "no_text", "invalid_url", "failed_to_download"]
    assert [rows[u]["id"] for u in urls] == [f"doc{i}" for i in range(len(urls))]
    assert all(r["topic"] == "test" for r in rows.values())
    assert rows[urls[2]]["http_status"] == 404 and not rows[urls[2]]["retryable"]
    assert rows[urls[3]]["error_message"] == "X-Robots-Tag: noai"
    assert rows[urls[9]]["http_status"] == 503 and rows[urls[9]]["retryable"]
    assert state.hits.get("/private/secret.html") is None

    rivers, berge = rows[urls[0]], rows[urls[1]]
    assert (rivers["title"], rivers["language"], rivers["date"]) == (
        "How the River Shaped the Valley", "en", "2023-04-05")
    assert (berge["title"], berge["language"], berge["date"]) == ("Wie die Alpen entstanden", "de", None)
    assert rivers["content_type"] == "text/html; charset=utf-8" and rivers["bytes"] > rivers["chars"] > 0

    samples = {s["json"]["url"]: s for s in read_samples(out).values()}
    assert set(samples) == {urls[0], urls[1], urls[6]}
    for url, paragraphs in ((urls[0], RIVERS), (urls[1], BERGE)):
        text = samples[url]["txt"]
        assert all(p in text for p in paragraphs)
        assert "News desk" not in text and "All rights reserved" not in text
    assert samples[urls[6]]["txt"] == "Plain notes, über alles.\n"

    # A rerun with --retry-failed refetches only the transient failure and keeps the rest.
    state.flaky_down = False
    hits_before = dict(state.hits)
    result = crawl_text(config.model_copy(update={"retry_failed": True}))

    assert result.ok
    again = {r["url"]: r for r in read_rows(out)}
    assert again[urls[9]]["status"] == "success" and not again[urls[9]]["retryable"]
    assert {u: again[u]["status"] for u in urls[:9]} == {u: rows[u]["status"] for u in urls[:9]}
    # Only the transient failure is fetched again; robots.txt too unless the same worker process,
    # which keeps it cached, runs the retry.
    new_hits = {p: n - hits_before.get(p, 0) for p, n in state.hits.items() if n != hits_before.get(p)}
    assert new_hits.pop("/flaky.html") == 1
    assert new_hits in ({}, {"/robots.txt": 1})
    assert set(s["json"]["url"] for s in read_samples(out).values()) == {urls[0], urls[1], urls[6], urls[9]}
    assert result.manifest["samples"] == 4


def test_cli_crawls_text(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"id": "x", "text": "hello from the command line"}) + "\n")
    out = tmp_path / "out"

    run = CliRunner().invoke(app, ["crawl", "text", "--input", str(tmp_path / "corpus.jsonl"), "--output", str(out),
                                   "--quiet"])

    assert run.exit_code == 0, run.output
    assert json.loads((out / "manifest.json").read_text())["samples"] == 1
    bad = CliRunner().invoke(app, ["crawl", "text", "--input", str(tmp_path / "nothing.jsonl"), "--output", str(out)])
    assert bad.exit_code == 2 and "no such file or folder" in " ".join(bad.output.split())
