"""The settings of `pipelines crawl images` and `pipelines crawl text` (the runs are `pipelines.ingest.images` and
`pipelines.ingest.text`). Kept apart from the runs, which import Ray, aiohttp and OpenCV, so that the CLI builds its
options and answers `--help` without them."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator

from pipelines import __version__
from pipelines.config import ConfigModel

USER_AGENT_TOKEN = "pipelines-crawler"
DEFAULT_USER_AGENT = (f"{USER_AGENT_TOKEN}/{__version__} (research dataset crawler; "
                      "obeys robots.txt and X-Robots-Tag noai/noimageai)")


# -- fetching (both crawls) ------------------------------------------------------------------------

class FetchConfig(ConfigModel):
    user_agent: str = Field(DEFAULT_USER_AGENT, description="User-Agent header; robots.txt rules are matched on it.")
    timeout: float = Field(10.0, gt=0, description="Hard deadline in seconds for one attempt, redirects included.")
    max_bytes: int = Field(16 * 2**20, gt=0, description="Largest body accepted; longer downloads are aborted.")
    max_redirects: int = Field(5, ge=0, description="Redirects followed per request, each re-checked.")
    retries: int = Field(2, ge=0, description="Extra attempts after a transient failure (timeout, 5xx, 429, reset).")
    backoff: float = Field(0.5, ge=0, description="Base of the exponential backoff in seconds (with jitter).")
    max_retry_after: float = Field(60.0, ge=0, description="Longest Retry-After honoured; a longer one fails the row.")
    max_crawl_delay: float = Field(10.0, ge=0, description=(
        "Longest robots.txt Crawl-delay honoured; the URLs of a host asking for more are skipped "
        "(skipped_robots, retryable)."))
    max_host_wait: float = Field(60.0, ge=0, description=(
        "Longest a request queues for its turn at a host whose Crawl-delay spaces requests; requests "
        "that would wait longer fail (retryable) and free their place for other hosts."))
    concurrency: int = Field(64, gt=0, description="Concurrent requests per worker.")
    per_host_concurrency: int = Field(16, gt=0, description="Concurrent requests per host per worker.")
    per_host_rate: float | None = Field(None, gt=0, description="Requests per second per host per worker (none: unlimited).")
    respect_robots: bool = Field(True, description="Fetch and obey robots.txt.")
    respect_opt_out: bool = Field(True, description="Obey X-Robots-Tag opt-out directives.")
    opt_out_directives: list[str] = Field(["noai", "noimageai", "noindex", "noimageindex"],
                                          description="X-Robots-Tag directives that skip a URL.")
    allow_private_network: bool = Field(False, description=(
        "Allow URLs resolving to private, loopback or link-local addresses (tests, intranets)."))
    allowed_networks: list[str] = Field([], description=(
        "Non-public networks (CIDR, e.g. 10.20.0.0/16) the crawl may still reach while the others "
        "stay refused; allow_private_network allows them all."))

    @field_validator("allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net)
            except ValueError as exc:
                raise ValueError(f"allowed_networks: {exc}") from None
        return value


# Fetch settings that change how fast or how hard a crawl runs, not which rows may become samples
# (robots, opt-out, byte cap and address rules do decide that, so they stay in config digests).
FETCH_RUN_OPTIONS = {"user_agent", "timeout", "retries", "backoff", "max_retry_after", "max_crawl_delay",
                     "max_host_wait", "concurrency", "per_host_concurrency", "per_host_rate"}


# -- images ---------------------------------------------------------------------------------------

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]


class ImageConfig(ConfigModel):
    image_size: int = Field(256, gt=0, description="Target size in pixels (meaning depends on the resize mode).")
    resize_mode: ResizeMode = Field("keep_ratio", description=(
        "no: keep as is; keep_ratio: smallest side to image_size; keep_ratio_largest: largest side to "
        "image_size; center_crop: smallest side to image_size then a centred square crop; border: largest "
        "side to image_size then padded to a square with white."))
    resize_only_if_bigger: bool = Field(False, description="Never upscale small images.")
    min_image_size: int = Field(0, ge=0, description="Filter images whose smaller side is below this.")
    max_image_area: float | None = Field(None, gt=0, description="Filter images with more pixels than this.")
    max_aspect_ratio: float | None = Field(None, ge=1, description="Filter images whose long/short side ratio exceeds this.")
    output_format: Literal["jpg", "webp", "png"] = Field("jpg", description="Encoding of the stored image.")
    encode_quality: int = Field(95, ge=0, le=100, description="JPEG/WebP quality (PNG: compression 0-9).")
    max_decode_pixels: int = Field(89_478_485, gt=0, description=(
        "Decompression-bomb limit: images declaring more pixels are refused before decoding."))


class ImageCrawlConfig(ConfigModel):
    input: str = Field(description="URL list: jsonl/csv/tsv/parquet/txt file or folder, local or fsspec URL.")
    output: str = Field(description="Output folder (local or fsspec URL).")
    input_format: Literal["jsonl", "csv", "tsv", "parquet", "txt"] | None = Field(
        None, description="Input format (default: from the file extension).")
    url_col: str = Field("url", description="Column holding the image URL.")
    caption_col: str | None = Field("caption", description="Column holding the caption ('' for none).")
    require_caption: bool = Field(False, description="Record rows with an empty caption as failed.")
    save_additional_columns: bool = Field(True, description="Carry other input columns into the metadata.")
    shard_size: int = Field(1000, gt=0, description="Input rows per shard.")
    image: ImageConfig = ImageConfig()
    fetch: FetchConfig = FetchConfig()
    decode_threads: int = Field(2, gt=0, description="Decode/resize threads per shard task.")
    max_in_flight: int | None = Field(None, gt=0, description="Shard tasks queued at once (default 2 x cluster CPUs).")
    task_retries: int = Field(3, ge=0, description="Times Ray reruns a shard whose worker died.")
    retry_failed: bool = Field(False, description="Refetch rows of finished shards whose failure was transient.")
    overwrite: bool = Field(False, description=(
        "Start over: remove the shards already in the output (else a rerun resumes, and refuses an output "
        "made from another input or with other settings)."))
    quiet: bool = Field(False, description="No progress bar or summary.")

    run_options = {"output": True, "fetch": FETCH_RUN_OPTIONS, "decode_threads": True, "max_in_flight": True,
                   "task_retries": True, "retry_failed": True, "overwrite": True, "quiet": True}


# -- text -----------------------------------------------------------------------------------------

class TextExtractionConfig(ConfigModel):
    favor_precision: bool = Field(False, description="Extract less text, with less boilerplate.")
    favor_recall: bool = Field(False, description="Extract more text, at the risk of boilerplate.")
    include_comments: bool = Field(False, description="Keep a page's comment section in the text.")
    include_tables: bool = Field(True, description="Keep the text of tables.")


class TextCrawlConfig(ConfigModel):
    input: str = Field(description="Corpus or URL list: jsonl/csv/tsv/parquet/txt file or folder, local or fsspec URL.")
    output: str = Field(description="Output folder (local or fsspec URL).")
    input_format: Literal["jsonl", "csv", "tsv", "parquet", "txt"] | None = Field(
        None, description="Input format (default: from the file extension). txt: one document or URL per line.")
    source: Literal["files", "urls"] = Field(
        "files", description="files: documents are in the input; urls: the input lists web pages to fetch.")
    text_col: str = Field("text", description="Column holding the document text (source=files).")
    id_col: str | None = Field("id", description=(
        "Column holding the document id, kept as `id` ('' for none). If left at its default, an input "
        "without it just has no ids; if set, it must exist."))
    url_col: str = Field("url", description="Column holding the page URL (source=urls; kept as `url` for files).")
    min_chars: int = Field(1, ge=1, description="Shortest text kept; shorter texts are recorded as `filtered`.")
    save_additional_columns: bool = Field(True, description="Carry other input columns into the metadata.")
    shard_size: int = Field(1000, gt=0, description="Input rows per shard.")
    extraction: TextExtractionConfig = TextExtractionConfig()
    fetch: FetchConfig = FetchConfig()
    max_in_flight: int | None = Field(None, gt=0, description="Shard tasks queued at once (default 2 x cluster CPUs).")
    task_retries: int = Field(3, ge=0, description="Times Ray reruns a shard whose worker died.")
    retry_failed: bool = Field(False, description="Refetch rows of finished shards whose failure was transient.")
    overwrite: bool = Field(False, description=(
        "Start over: remove the shards already in the output (else a rerun resumes, and refuses an output "
        "made from another input or with other settings)."))
    quiet: bool = Field(False, description="No progress bar or summary.")

    run_options = {"output": True, "fetch": FETCH_RUN_OPTIONS, "max_in_flight": True,
                   "task_retries": True, "retry_failed": True, "overwrite": True, "quiet": True}
