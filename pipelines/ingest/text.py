"""`pipelines crawl text`: text corpora and web pages into WebDataset shards (`KEY.txt` + `KEY.json`).

Two sources, one shard layout (the image crawl's): `files` reads documents from a corpus
(jsonl/parquet/csv/tsv, or txt with one document per line); `urls` fetches a URL list of web pages
with the shared `Fetcher` (robots.txt, X-Robots-Tag opt-outs, private-network guard) and extracts
each page's main text, title, language and date with trafilatura.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import trafilatura
from lxml.html import HtmlElement
from trafilatura.settings import set_date_params

from pipelines.ingest.config import TextCrawlConfig, TextExtractionConfig
from pipelines.ingest.crawl import CrawlResult, ProgressReporter, run_sharded
from pipelines.ingest.fetch import Fetcher
from pipelines.ingest.reader import InputReader, Row
from pipelines.ingest.rows import InvalidRow, stored_row, text_of, to_json, valid_text
from pipelines.ingest.shards import metadata_table, shard_stats
from pipelines.shards import ShardOutput, shard_files, write_shard

# Per-row metadata. `bytes` is the size of the document as read (the page body, or the input text);
# `retryable` marks transient fetch failures.
METADATA_SCHEMA = pa.schema([
    ("key", pa.string()), ("id", pa.string()), ("url", pa.string()), ("title", pa.string()),
    ("language", pa.string()), ("date", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
    ("http_status", pa.int32()), ("content_type", pa.string()), ("bytes", pa.int64()),
    ("final_url", pa.string()), ("fetch_ms", pa.float64()), ("chars", pa.int64()), ("sha256", pa.string()),
    ("retryable", pa.bool_()),
])
STATUSES = ("success", "failed_to_download", "too_large", "skipped_robots", "skipped_opt_out",
            "skipped_private_network", "invalid_url", "invalid_row", "not_html", "no_text", "empty_text", "filtered")
# Input columns that mean the same as a metadata field: carried into it (extraction may overwrite them).
SHARED_COLUMNS = ("title", "language", "date")
HTML_TYPES = ("text/html", "application/xhtml+xml")
ACCEPT = "text/html,application/xhtml+xml;q=0.9,text/plain;q=0.8"
# In document order, so `<html lang>` comes before the meta tags.
DECLARED_LANGUAGE = ("/html/@lang | /html/@xml:lang"
                     " | //meta[translate(@http-equiv, 'CONTENT-LANGUAGE', 'content-language')"
                     " = 'content-language']/@content"
                     " | //meta[@property='og:locale']/@content")


def crawl_text(config: TextCrawlConfig) -> CrawlResult:
    """Crawl the corpus or URL list of `config.input` into text shards under `config.output`."""
    required = [config.text_col if config.source == "files" else config.url_col]
    if config.id_col and "id_col" in config.model_fields_set:
        required.append(config.id_col)
    reader = InputReader(config.input, required, config.input_format)
    return run_sharded(kind="text", reader=reader, output=config.output, shard_size=config.shard_size,
                       task=crawl_text_shard, config=config, retry_failed=config.retry_failed,
                       overwrite=config.overwrite, max_in_flight=config.max_in_flight, task_retries=config.task_retries, quiet=config.quiet)


def crawl_text_shard(shard_id: int, rows: list[Row], config: TextCrawlConfig, counter: Any,
                     retry_only: bool = False, input_digest: str | None = None) -> dict[str, Any]:
    """One shard, in a Ray worker: documents from the rows or from fetched pages, written atomically.
    `input_digest` (of the rows) goes into the shard's stats, for a rerun to check its input against."""
    started = time.time()
    # trafilatura and htmldate log a warning for every page they find no text in.
    for name in ("trafilatura", "htmldate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = ShardOutput(config.output)
    digits = len(str(config.shard_size - 1))
    metas: dict[int, tuple[dict[str, Any], bytes]] = {}  # the stored row and its JSON text
    samples: dict[str, dict[str, bytes]] = {}
    if retry_only:
        tar_name, parquet_name, _ = shard_files(shard_id)
        old_samples = out.read_tar(tar_name)
        for index, previous in enumerate(out.read_parquet(parquet_name).to_pylist()):
            if not previous["retryable"]:
                metas[index] = previous, to_json(previous).encode()
                if previous["key"] in old_samples:
                    samples[previous["key"]] = old_samples[previous["key"]]

    progress = ProgressReporter(counter)
    todo = [(i, _row_meta(f"{shard_id:05d}{i:0{digits}d}", row, config), row)
            for i, row in enumerate(rows) if i not in metas]
    if config.source == "files":
        texts = [_text_from_row(meta, row, config) for _, meta, row in todo]
        for _, meta, _ in todo:
            progress.add(meta["status"])
    else:
        texts = asyncio.run(_texts_from_pages([(meta, row) for _, meta, row in todo], config, progress))
    progress.flush()
    for (index, meta, _), text in zip(todo, texts, strict=True):
        meta, meta_json = stored_row(meta, METADATA_SCHEMA)
        if text is not None and meta["status"] == "success":
            samples[meta["key"]] = {"txt": text.encode(), "json": meta_json}
        metas[index] = meta, meta_json

    order = sorted(metas)
    ordered, jsons = [metas[i][0] for i in order], [metas[i][1] for i in order]
    stats = shard_stats(config.digest(), ordered, started,
                        chars=sum(m["chars"] or 0 for m in ordered if m["status"] == "success"))
    return write_shard(out, shard_id, ((k, samples[k]) for k in sorted(samples)),
                       metadata_table(ordered, METADATA_SCHEMA, jsons), stats, input_digest)


def _row_meta(key: str, row: Row, config: TextCrawlConfig) -> dict[str, Any]:
    """A row's metadata before its text is looked at: our fields, then its other columns (an input column
    named like one of our fields is not carried, except `title`, `language` and `date`, which mean the same)."""
    meta: dict[str, Any] = {f.name: None for f in METADATA_SCHEMA}
    meta.update(key=key, retryable=False)
    if isinstance(row, InvalidRow):
        meta.update(status="invalid_row", error_message=row.reason)
        return meta
    own = {config.url_col, config.id_col} | ({config.text_col} if config.source == "files" else set())
    for k, v in row.items():
        if k in SHARED_COLUMNS:
            meta[k] = text_of(v)
        elif config.save_additional_columns and k not in own and k not in meta:
            meta[k] = v
    meta.update(id=text_of(row.get(config.id_col)) if config.id_col else None, url=text_of(row.get(config.url_col)))
    return meta


def _accept_text(meta: dict[str, Any], text: str, config: TextCrawlConfig) -> str | None:
    """Record the text's size and digest; the text if it is kept, else None with the reason."""
    text = valid_text(text)  # a page in UTF-7 can hold lone surrogates
    meta.update(chars=len(text), sha256=hashlib.sha256(text.encode()).hexdigest())
    if not text.strip():
        meta.update(status="empty_text", error_message="text is empty")
        return None
    if len(text) < config.min_chars:
        meta.update(status="filtered", error_message=f"{len(text)} chars < min_chars={config.min_chars}")
        return None
    meta["status"] = "success"
    return text


def _text_from_row(meta: dict[str, Any], row: Row, config: TextCrawlConfig) -> str | None:
    if isinstance(row, InvalidRow):
        return None
    text = row.get(config.text_col)
    if text is None:
        meta.update(status="empty_text", error_message=f"no {config.text_col!r}")
        return None
    if not isinstance(text, str):
        meta.update(status="invalid_row", error_message=f"{config.text_col!r} is {type(text).__name__}, not text")
        return None
    meta["bytes"] = len(valid_text(text).encode())
    return _accept_text(meta, text, config)


@dataclass
class Page:
    """What extraction found in a fetched page (text None: no main text)."""

    text: str | None
    title: str | None = None
    language: str | None = None
    date: str | None = None


def _media_type(content_type: str | None) -> tuple[str, str | None]:
    """(media type, charset) of a Content-Type header; ('', None) when absent."""
    if not content_type:
        return "", None
    media, *params = (p.strip() for p in content_type.split(";"))
    charset = next((p.partition("=")[2].strip("\"' ") for p in params if p.lower().startswith("charset=")), None)
    return media.lower(), charset or None


def _decode(data: bytes, charset: str | None) -> str | bytes:
    """The body decoded by its declared charset; the bytes themselves (for trafilatura to sniff) if none works."""
    if charset:
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            pass
    return data


def _declared_language(tree: HtmlElement) -> str | None:
    """The language a page declares: `<html lang>`, else Content-Language or og:locale meta tags."""
    for value in tree.xpath(DECLARED_LANGUAGE, namespaces={"xml": "http://www.w3.org/XML/1998/namespace"}):
        tag = value.split(",")[0].strip().replace("_", "-")
        if tag:
            return tag
    return None


def extract_page(data: bytes, url: str, media: str, charset: str | None, options: TextExtractionConfig) -> Page:
    """Main text and metadata of a fetched page (runs on the extraction thread)."""
    body = _decode(data, charset)
    if media == "text/plain":
        return Page(body if isinstance(body, str) else body.decode("utf-8", errors="replace"))
    tree = trafilatura.load_html(body)
    if tree is None:
        return Page(None)
    language = _declared_language(tree)
    # No extensive date search: it takes any date in the text (a copyright line) for the publication date.
    doc = trafilatura.bare_extraction(
        tree, url=url, with_metadata=True, date_extraction_params=set_date_params(extensive=False),
        include_comments=options.include_comments, include_tables=options.include_tables,
        favor_precision=options.favor_precision, favor_recall=options.favor_recall)
    if doc is None:
        return Page(None, language=language)
    return Page(doc.text or None, title=doc.title, language=language, date=doc.date)


async def _texts_from_pages(items: list[tuple[dict[str, Any], Row]], config: TextCrawlConfig,
                            progress: ProgressReporter) -> list[str | None]:
    """Fetch every row's page concurrently and extract its text; fill each row's metadata."""
    loop = asyncio.get_running_loop()
    # The connector bounds connections; this bounds bodies held in memory awaiting extraction.
    in_flight = asyncio.Semaphore(config.fetch.concurrency)

    # One thread: extraction holds the GIL, so more threads do not extract faster, but moving it
    # off the event loop lets downloads go on while a page is being extracted.
    with ThreadPoolExecutor(1, thread_name_prefix="extract") as pool:
        async with Fetcher(config.fetch, accept=ACCEPT) as fetcher:

            async def one(meta: dict[str, Any], row: Row) -> str | None:
                try:
                    text = await page_text(meta, row)
                except Exception as exc:  # noqa: BLE001 - whatever one row raises is that row's failure
                    meta.update(status="invalid_row", error_message=f"{type(exc).__name__}: {exc}", retryable=False)
                    text = None
                progress.add(meta["status"])
                return text

            async def page_text(meta: dict[str, Any], row: Row) -> str | None:
                if isinstance(row, InvalidRow):
                    return None
                url = (meta["url"] or "").strip()
                if not url:
                    meta.update(status="invalid_url", error_message=f"empty {config.url_col!r}")
                    return None
                async with in_flight:
                    res = await fetcher.fetch(url)
                    meta.update(status=res.status, error_message=res.error_message, http_status=res.http_status,
                                content_type=res.content_type, final_url=res.final_url,
                                fetch_ms=round(res.fetch_ms, 1), retryable=res.retryable)
                    if res.status != "success":
                        return None
                    meta["bytes"] = len(res.data)
                    media, charset = _media_type(res.content_type)
                    if media and media not in HTML_TYPES and media != "text/plain":
                        meta.update(status="not_html", error_message=f"content type {media} is not HTML or text")
                        return None
                    try:
                        page = await loop.run_in_executor(
                            pool, extract_page, res.data, res.final_url or url, media, charset, config.extraction)
                    except Exception as exc:  # a parser failing on one hostile page must not fail the shard
                        meta.update(status="no_text", error_message=f"extraction failed: {type(exc).__name__}: {exc}")
                        return None
                for name in SHARED_COLUMNS:  # what the page says wins over the input's own columns
                    meta[name] = getattr(page, name) or meta[name]
                if page.text is None:
                    meta.update(status="no_text", error_message="no main text found")
                    return None
                return _accept_text(meta, page.text, config)

            return await asyncio.gather(*(one(meta, row) for meta, row in items))
