"""`pipelines crawl images`: caption-image URL lists into WebDataset shards (img2dataset's layout)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipelines.ingest.config import ImageCrawlConfig
from pipelines.ingest.crawl import CrawlResult, ProgressReporter, run_sharded
from pipelines.ingest.reader import InputReader, Row
from pipelines.ingest.rows import InvalidRow, stored_row, text_of, to_json
from pipelines.ingest.shards import metadata_table, shard_stats
from pipelines.shards import ShardOutput, ShardWriter, shard_files

# Per-row metadata: a superset of img2dataset's. `retryable` marks transient failures.
METADATA_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("http_status", pa.int32()), ("content_type", pa.string()),
    ("bytes", pa.int64()), ("final_url", pa.string()), ("fetch_ms", pa.float64()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("sha256", pa.string()), ("retryable", pa.bool_()),
])
STATUSES = ("success", "failed_to_download", "not_an_image", "failed_to_decode", "too_large", "filtered",
            "skipped_robots", "skipped_opt_out", "skipped_private_network", "invalid_url", "invalid_row",
            "missing_caption")


def crawl_images(config: ImageCrawlConfig) -> CrawlResult:
    """Crawl the URL list of `config.input` into shards under `config.output`."""
    reader = InputReader(config.input, [config.url_col], config.input_format)
    return run_sharded(kind="images", reader=reader, output=config.output, shard_size=config.shard_size,
                       task=crawl_image_shard, config=config, retry_failed=config.retry_failed,
                       overwrite=config.overwrite, max_in_flight=config.max_in_flight, task_retries=config.task_retries, quiet=config.quiet)


def crawl_image_shard(shard_id: int, rows: list[Row], config: ImageCrawlConfig, counter: Any,
                      retry_only: bool = False, input_digest: str | None = None) -> dict[str, Any]:
    """One shard, in a Ray worker: fetch concurrently, decode on a thread pool, write atomically.
    `input_digest` (of the rows) goes into the shard's stats, for a rerun to check its input against."""
    return asyncio.run(_crawl_shard(shard_id, rows, config, counter, retry_only, input_digest))


def _row_meta(key: str, row: Row, config: ImageCrawlConfig) -> dict[str, Any]:
    """A row's metadata before its fetch: our fields, then its other columns (an input column named like
    one of our fields is not carried)."""
    meta: dict[str, Any] = {f.name: None for f in METADATA_SCHEMA}
    meta.update(key=key, retryable=False)
    if isinstance(row, InvalidRow):
        meta.update(status="invalid_row", error_message=row.reason)
        return meta
    if config.save_additional_columns:
        for k, v in row.items():
            if k not in (config.url_col, config.caption_col) and k not in meta:
                meta[k] = v
    meta.update(url=text_of(row.get(config.url_col)),
                caption=text_of(row.get(config.caption_col)) if config.caption_col else None)
    return meta


async def _crawl_shard(shard_id: int, rows: list[Row], config: ImageCrawlConfig, counter: Any,
                       retry_only: bool, input_digest: str | None) -> dict[str, Any]:
    # Only the shard tasks fetch and decode: the command's own process, which starts Ray only after its imports,
    # does without aiohttp and OpenCV (0.16 s of a crawl's start on this machine).
    from pipelines.ingest.fetch import Fetcher
    from pipelines.ingest.imageproc import ImageError, ImageProcessor

    started = time.time()
    out = ShardOutput(config.output)
    old_meta: dict[str, dict[str, Any]] = {}
    old_samples: dict[str, dict[str, bytes]] = {}
    if retry_only:
        tar_name, parquet_name, _ = shard_files(shard_id)
        old_meta = {r["key"]: r for r in out.read_parquet(parquet_name).to_pylist()}
        old_samples = out.read_tar(tar_name)

    processor = ImageProcessor(config.image)

    def decode(data: bytes) -> tuple[str, Any]:
        """sha256 of the bytes and the processed image or the ImageError (runs on the thread pool)."""
        digest = hashlib.sha256(data).hexdigest()
        try:
            return digest, processor.process(data)
        except ImageError as exc:
            return digest, exc

    progress = ProgressReporter(counter)
    digits = len(str(config.shard_size - 1))
    loop = asyncio.get_running_loop()
    # The connector bounds connections; this bounds bodies held in memory awaiting decode.
    in_flight = asyncio.Semaphore(config.fetch.concurrency)
    # Samples stream into the staged tar as they complete: finishing the shard costs little.
    writer = ShardWriter(out, shard_id, input_digest)

    async def one(index: int, row: Row) -> tuple[dict[str, Any], bytes]:
        """The row's stored metadata and its JSON text."""
        key = f"{shard_id:05d}{index:0{digits}d}"
        previous = old_meta.get(key)
        if previous is not None and not previous.get("retryable"):
            if key in old_samples:
                writer.add(key, old_samples[key])
            return previous, to_json(previous).encode()
        meta = _row_meta(key, row, config)
        try:
            sample = await fill(meta)
        except Exception as exc:  # noqa: BLE001 - whatever one row raises is that row's failure
            meta.update(status="invalid_row", error_message=f"{type(exc).__name__}: {exc}", retryable=False)
            sample = None
        meta, meta_json = stored_row(meta, METADATA_SCHEMA)
        if sample is not None and meta["status"] == "success":
            if meta["caption"] is not None:
                sample["txt"] = meta["caption"].encode()
            sample["json"] = meta_json
            writer.add(meta["key"], sample)
        progress.add(meta["status"])
        return meta, meta_json

    async def fill(meta: dict[str, Any]) -> dict[str, bytes] | None:
        """Fetch and decode the row's image into `meta`; the image file of its sample, if it has one."""
        url = meta["url"]
        if meta["status"] == "invalid_row":
            return None
        if not url or not url.strip():
            meta.update(status="invalid_url", error_message=f"empty {config.url_col!r}")
            return None
        if config.require_caption and not (meta["caption"] or "").strip():
            meta.update(status="missing_caption", error_message=f"empty {config.caption_col!r}")
            return None
        async with in_flight:
            res = await fetcher.fetch(url.strip())
            meta.update(status=res.status, error_message=res.error_message, http_status=res.http_status,
                        content_type=res.content_type, final_url=res.final_url,
                        fetch_ms=round(res.fetch_ms, 1), retryable=res.retryable)
            if res.status != "success":
                return None
            meta["bytes"] = len(res.data)
            digest, image = await loop.run_in_executor(pool, decode, res.data)
        meta["sha256"] = digest
        if isinstance(image, ImageError):
            meta.update(status=image.status, error_message=str(image))
            return None
        meta.update(width=image.width, height=image.height, original_width=image.original_width,
                    original_height=image.original_height)
        return {image.ext: image.data}

    try:
        with ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode") as pool:
            async with Fetcher(config.fetch, accept="image/*") as fetcher:
                done = await asyncio.gather(*(one(i, r) for i, r in enumerate(rows)))
    except BaseException:
        writer.abort()
        raise
    progress.flush()

    metas = [meta for meta, _ in done]
    status = Counter(m["status"] for m in metas)
    stats = shard_stats(config.digest(), metas, started,
                        failed_to_resize=status.get("failed_to_decode", 0) + status.get("not_an_image", 0))
    return writer.close(metadata_table(metas, METADATA_SCHEMA, [meta_json for _, meta_json in done]), stats)
