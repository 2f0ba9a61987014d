"""Drive a sharded crawl on Ray: one task per shard-sized partition of the input, resumable.

The driver streams the input, submits one Ray task per shard (at most `max_in_flight` at a time, so
a 100-million-row list never sits in memory), skips shards already written, and shows progress fed
by the tasks through a small actor (unless quiet). A task whose worker dies is retried by Ray; a shard that still
fails is reported, the others go on, and a rerun of the same command resumes.

A run owns its output (a second run into it is refused) and resumes only from shards made from the
same input: each shard's stats record a digest of exactly its input rows (and of whether they end the
input), which a rerun compares before it writes anything.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines.errors import PipelineError
from pipelines.ingest.reader import InputReader, Row
from pipelines.runtime import cluster_cpus, filesystem, init_ray, settings, stop_local_ray
from pipelines.shards import MANIFEST, ShardOutput, absolute, owned, shard_files, url_of, write_manifest

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Counts rows by status as tasks report them (for display only: retried tasks count twice)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, delta: dict[str, int]) -> None:
        self.counts.update(delta)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class ProgressReporter:
    """Used inside a task: batches status counts and sends them to the driver's counter."""

    def __init__(self, counter: Any, every_s: float = 0.5):
        self.counter, self.every_s = counter, every_s
        self.pending: Counter = Counter()
        self.last = time.monotonic()

    def add(self, status: str) -> None:
        self.pending[status] += 1
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.counter is not None:
            self.counter.add.remote(dict(self.pending))
        self.pending.clear()
        self.last = time.monotonic()


@dataclass
class CrawlResult:
    manifest: dict[str, Any]
    failed_shards: dict[int, str] = field(default_factory=dict)
    written: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed_shards


ShardTask = Callable[..., dict[str, Any]]


def rows_digest(rows: list[Row], last: bool) -> str:
    """What identifies a shard's input: its rows, and whether they end the input (so that a longer
    input, even one that only adds whole shards, is another input)."""
    h = hashlib.sha256(b"last\n" if last else b"more\n")
    for row in rows:
        try:
            line = json.dumps(row, sort_keys=True, default=repr)
        except (TypeError, ValueError, RecursionError):  # keys that do not sort, nesting too deep to encode
            line = f"unencodable {type(row).__name__}"
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def input_shards(reader: InputReader, shard_size: int) -> Iterator[tuple[int, list[Row], str]]:
    """(shard id, rows, `rows_digest`) of every shard of the input, streamed (one shard of lookahead)."""
    shards = iter(reader.shards(shard_size))
    sid, rows = 0, next(shards, None)
    while rows is not None:
        following = next(shards, None)
        yield sid, rows, rows_digest(rows, last=following is None)
        sid, rows = sid + 1, following


def input_lineage(reader: InputReader) -> dict[str, Any]:
    """What the manifest records of the input list, for `pipelines lineage`: its URL, each file's sha256 (what
    `sha256sum` prints) and one digest of them all. Read again at the end, so it names the bytes the crawl read
    unless the list changed during the crawl."""
    files = []
    for path in reader.files:
        h = hashlib.sha256()
        try:
            fs, inner = filesystem(path)
            with fs.open(inner, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except Exception as exc:  # noqa: BLE001 - gone or unreadable since: the crawl's output still stands
            log.warning("%s: cannot read the input again to record its digest (%s)", path, exc)
            return {"path": absolute(reader.url), "digest": None, "files": []}
        files.append({"path": absolute(path), "sha256": h.hexdigest()})
    whole = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    return {"path": absolute(reader.url), "digest": files[0]["sha256"] if len(files) == 1 else whole, "files": files}


def start_ray() -> bool:
    """`init_ray` for a crawl; whether Ray runs on this machine alone (no RAY_ADDRESS).

    A local Ray started here runs its workers at niceness 0 and is stopped at exit without Ray's own waits."""
    local = settings().ray_address is None
    if ray.is_initialized() or not local:
        init_ray()
        return local
    # Ray starts local workers at niceness 15: with any other busy process on the machine the shard tasks would
    # get a sliver of the CPU (the 1.0x-0.7x of img2dataset's speed measured under load before this).
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray(lean=True)  # its tasks ask for one CPU: the autoscaler's monitor would have nothing to report
    atexit.register(stop_local_ray)  # after Ray's own exit hook, so it runs first
    return local


def check_resumable(output: str, reader: InputReader, shard_size: int, config_digest: str,
                    done_stats: dict[int, dict[str, Any]]) -> None:
    """Refuse, before any work, to resume from shards made with other settings or from other input rows."""
    start_over = "resume with the same input and settings, write to another --output, or pass --overwrite"
    for sid, stats in done_stats.items():
        if stats.get("config_digest") != config_digest:
            raise PipelineError(
                f"{output}: shard {sid:05d} was made with other settings (config digest "
                f"{str(stats.get('config_digest'))[:12]}, now {config_digest[:12]}); {start_over}")
    if not done_stats:
        return
    beyond = set(done_stats)
    for sid, _, digest in input_shards(reader, shard_size):
        beyond.discard(sid)
        if sid in done_stats and done_stats[sid].get("input_digest") != digest:
            raise PipelineError(f"{output}: shard {sid:05d} was made from other input rows (the input changed, "
                                f"or its length); {start_over}")
    if beyond:
        raise PipelineError(f"{output}: shard {min(beyond):05d} was made from input rows that are no longer there "
                            f"(the input is shorter); {start_over}")


def run_sharded(*, kind: str, reader: InputReader, output: str, shard_size: int, task: ShardTask,
                config: Any, retry_failed: bool = False, overwrite: bool = False, max_in_flight: int | None = None,
                task_retries: int = 3, quiet: bool = False) -> CrawlResult:
    """Run `task(shard_id, rows, config, counter, retry_only, input_digest)` over every shard of `reader`'s
    rows, holding the output for the run; `overwrite` first removes shards a previous run left."""
    out = ShardOutput(output)
    with owned(out):
        if overwrite:
            out.remove_shards()
        return _run_sharded(out, kind=kind, reader=reader, output=output, shard_size=shard_size, task=task,
                            config=config, retry_failed=retry_failed, max_in_flight=max_in_flight,
                            task_retries=task_retries, quiet=quiet)


def _run_sharded(out: ShardOutput, *, kind: str, reader: InputReader, output: str, shard_size: int,
                 task: ShardTask, config: Any, retry_failed: bool, max_in_flight: int | None, task_retries: int,
                 quiet: bool) -> CrawlResult:
    digest = config.digest()
    done_stats = {sid: out.read_json(shard_files(sid)[2]) for sid in sorted(out.done_shards())}
    check_resumable(output, reader, shard_size, digest, done_stats)
    local = start_ray()
    # A quiet crawl on a local Ray shows no progress, so it has no counter: the actor's worker process would be one
    # more Python interpreter starting on the two cores the first shard tasks wait for (about 1 s of a 3000-URL
    # crawl). On a cluster the counter stays on the driver's node, so losing a worker node does not take it along.
    counter = None if quiet and local else ProgressCounter.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ).remote()
    # The tasks, which may run in other folders or on other machines, get the output as an absolute URL.
    config = config.model_copy(update={"output": url_of(out.fs, out.root)})
    remote = ray.remote(task).options(num_cpus=1, max_retries=task_retries, retry_exceptions=False)
    max_in_flight = max_in_flight or 2 * cluster_cpus()
    console = Console(stderr=True, quiet=quiet)

    stats_by_shard: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    pending: dict[Any, int] = {}
    submitted: set[int] = set()
    skipped = 0
    start = time.time()

    def collect(timeout: float) -> None:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        for ref in ready:
            sid = pending.pop(ref)
            try:
                stats_by_shard[sid] = ray.get(ref)
            except Exception as exc:  # a shard that failed for good; the others go on
                failed[sid] = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("shards · {task.fields[rate]:.0f} rows/s · {task.fields[ok]:.1%} ok"),
                        TimeElapsedColumn(), console=console, transient=False, disable=quiet)

    with progress:
        bar = progress.add_task(f"crawl {kind}", total=None, rate=0.0, ok=0.0)

        def refresh() -> None:
            if counter is None:
                return
            counts = ray.get(counter.snapshot.remote())
            rows = sum(counts.values())
            elapsed = max(1e-9, time.time() - start)
            progress.update(bar, completed=len(stats_by_shard) + len(failed), rate=rows / elapsed,
                            ok=counts.get("success", 0) / rows if rows else 0.0)

        for sid, rows, rows_sha in input_shards(reader, shard_size):
            retry_only = False
            if sid in done_stats:
                if not (retry_failed and done_stats[sid].get("retryable")):
                    stats_by_shard[sid] = done_stats[sid]
                    skipped += 1
                    continue
                retry_only = True
            while len(pending) >= max_in_flight:
                collect(timeout=0.5)
                refresh()
            pending[remote.remote(sid, rows, config, counter, retry_only, rows_sha)] = sid
            submitted.add(sid)
            progress.update(bar, total=len(submitted) + skipped)
        progress.update(bar, total=len(submitted) + skipped)
        while pending:
            collect(timeout=0.5)
            refresh()
        refresh()

    elapsed = time.time() - start
    shard_stats = [stats_by_shard[s] for s in sorted(stats_by_shard)]
    status = Counter()
    for s in shard_stats:
        status.update(s["status"])
    crawled = [stats_by_shard[s] for s in sorted(submitted) if s in stats_by_shard]
    crawled_rows = sum(s["count"] for s in crawled)
    run_stats = {
        "total": sum(status.values()),
        "success": status.get("success", 0),
        "status": dict(sorted(status.items())),
        "shards_written": len(crawled),
        "shards_skipped": skipped,
        "shards_failed": len(failed),
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(crawled_rows / elapsed, 1) if elapsed else 0.0,
        "samples_per_s": round(sum(s["samples"] for s in crawled) / elapsed, 1) if elapsed else 0.0,
    }
    manifest = write_manifest(out, kind, config.model_dump(mode="json"), digest, shard_stats, run_stats,
                              extra={"input": input_lineage(reader)})
    result = CrawlResult(manifest, failed, written=len(crawled), skipped=skipped)
    if not quiet:
        print_summary(console, kind, url_of(out.fs, out.path(MANIFEST)), result)
    return result


def print_summary(console: Console, kind: str, manifest_path: str, result: CrawlResult) -> None:
    stats = result.manifest["stats"]
    console.print(f"crawl {kind}: {manifest_path}", soft_wrap=True, highlight=False)  # a title would wrap it
    table = Table(show_header=True)
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    total = max(1, stats["total"])
    for status, n in sorted(stats["status"].items(), key=lambda kv: -kv[1]):
        table.add_row(status, str(n), f"{n / total:.1%}")
    table.add_section()
    table.add_row("total", str(stats["total"]), "")
    console.print(table)
    console.print(f"{result.manifest['samples']} samples in {len(result.manifest['shards'])} shards "
                  f"({result.written} written, {result.skipped} already done) · {stats['elapsed_s']:.1f}s · "
                  f"{stats['samples_per_s']:.0f} samples/s")
    for sid, why in sorted(result.failed_shards.items()):
        console.print(f"[red]shard {sid:05d} failed: {why}[/red] (rerun the same command to resume)")
