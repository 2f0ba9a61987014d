"""`pipelines curate`: run the configured steps over crawled shards on Ray and write curated shards.

The steps are cut into phases at each deduplication step (it needs every shard at once):

    phase 0: shard tasks read the input, run the row steps before the first dedup, and write the
             surviving rows plus that dedup's signatures to work files;
    driver:  the dedup finds its duplicates over all signature files (Ray tasks);
    phase 1: shard tasks drop those duplicates, run the next row steps, ... ;
    last:    shard tasks write the output shards (tar + parquet + stats), in the input's layout.

Work files live in `OUTPUT/_work`, named by the digest of everything that decides them, so a rerun
resumes where a run stopped, a changed threshold recomputes only what it affects (row scores are
cached per step and row), and a rerun of a finished run does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import cloudpickle
from pydantic import Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines import __version__
from pipelines.config import ConfigModel
from pipelines.curate.dedup import SHARD_BITS
from pipelines.curate.registry import build_step
from pipelines.curate.step import DedupStep, Duplicates, SignatureRef, Step
from pipelines.errors import PipelineError
from pipelines.ingest.shards import MANIFEST, ShardOutput, ShardWriter, shard_files, write_manifest
from pipelines.runtime import cluster_cpus, filesystem, init_ray, url_of

IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")
REMOVED = "removed.parquet"
STATS = "stats.json"
REPORT = "report.html"
REMOVED_SCHEMA = pa.schema([
    ("key", pa.string()), ("step", pa.string()), ("reason", pa.string()), ("cluster_id", pa.string()),
    ("kept_key", pa.string()), ("similarity", pa.float64()), ("scores", pa.string()), ("chars", pa.int64()),
    ("width", pa.int64()), ("height", pa.int64()),
])


class CurateConfig(ConfigModel):
    input: str = Field(description="Shards written by `pipelines crawl` (or curate): folder or fsspec URL.")
    output: str = Field(description="Output folder for the curated shards (local or fsspec URL).")
    steps: list[dict[str, Any]] = Field(default_factory=list, json_schema_extra={"cli": False}, description=(
        "Ordered steps: `{step: NAME, PARAM: VALUE, ...}` (set them in the YAML config)."))
    partitions: int | None = Field(None, gt=0, description="Partitions of the dedup shuffles (default 2 x cluster CPUs).")
    max_in_flight: int | None = Field(None, gt=0, description="Shard tasks queued at once (default 2 x cluster CPUs).")
    task_retries: int = Field(3, ge=0, description="Times Ray reruns a shard task whose worker died.")
    report: bool = Field(True, description="Write report.html next to the output.")
    quiet: bool = Field(False, description="No progress bar or summary.")

    run_options = {"output": True, "partitions": True, "max_in_flight": True, "task_retries": True,
                   "report": True, "quiet": True}


@dataclass
class CurateResult:
    manifest: dict[str, Any]
    stats: dict[str, Any]
    up_to_date: bool = False
    failed_shards: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed_shards


@dataclass
class Phase:
    index: int
    row_steps: list[tuple[str, Step]]
    dedup: tuple[str, DedupStep] | None
    digest: str  # of everything that decides this phase's work files
    dedup_digest: str | None = None  # and of the dedup's result (its thresholds too)


@dataclass
class ShardJob:
    """What a shard task needs: where to read, what to run, where to write."""

    shard: int
    kind: str
    phase: Phase
    source: tuple[str, str]  # ("input", tar path) or ("work", parquet path)
    input_parquet: str
    input_sha256: str | None
    work_dir: str
    score_dir: str
    final: bool
    output: str
    run_digest: str
    drops: dict[str, np.ndarray] | None = None  # rows of the source removed by the previous dedup
    drop_label: str | None = None


def curate(config: CurateConfig) -> CurateResult:
    """Curate the shards of `config.input` with `config.steps` into `config.output`."""
    started = time.time()
    console = Console(stderr=True, quiet=config.quiet)
    in_fs, in_root = filesystem(config.input)
    manifest = _read_input_manifest(in_fs, in_root, config.input)
    labelled = _build_steps(config.steps, manifest, in_fs, in_root)
    run_digest = hashlib.sha256(f"{config.digest()} {manifest['digest']} {__version__}".encode()).hexdigest()
    out = ShardOutput(config.output)
    if out.fs.exists(out.path(MANIFEST)):
        previous = out.read_json(MANIFEST)
        if previous.get("run_digest") == run_digest:
            console.print(f"{config.output}: up to date (same input and config); nothing to do")
            return CurateResult(previous, out.read_json(STATS), up_to_date=True)
        out.fs.rm(out.path(MANIFEST))  # the shards are about to change: no stale manifest beside them
    out.remove_stale_temporaries()

    phases = _plan(labelled, run_digest, manifest["digest"])
    # Shard tasks run in other processes, maybe on other machines: they get URLs, never bare paths.
    in_url = url_of(in_fs, in_root.rstrip("/"))
    work_root = url_of(out.fs, out.path("_work"))
    kind = manifest.get("kind", "text")
    entries = {int(s["name"]): s for s in manifest["shards"]}
    init_ray()
    for _, step in labelled:
        _ship_by_value(type(step))
    parts = config.partitions or 2 * cluster_cpus()

    step_stats: dict[str, dict[str, Any]] = {label: _empty_stats() for label, _ in labelled}
    corrupt: dict[str, str] = {}
    failed: dict[str, str] = {}
    alive = sorted(entries)
    drops_by_shard: dict[int, dict[str, np.ndarray]] = {}
    drop_label: str | None = None
    final_stats: dict[int, dict[str, Any]] = {}
    timings: list[dict[str, Any]] = []
    for phase in phases:
        t_phase = time.time()
        final = phase.index == len(phases) - 1
        work_dir = f"{work_root}/p{phase.index}-{phase.digest[:16]}"
        jobs = [ShardJob(
            shard=sid, kind=kind, phase=phase,
            source=("input", f"{in_url}/{entries[sid]['tar']}") if phase.index == 0 else
            ("work", f"{work_root}/p{phase.index - 1}-{phases[phase.index - 1].digest[:16]}/{sid:05d}.parquet"),
            input_parquet=f"{in_url}/{entries[sid]['parquet']}", input_sha256=entries[sid].get("sha256"),
            work_dir=work_dir, score_dir=f"{work_root}/scores", final=final, output=url_of(out.fs, out.root),
            run_digest=run_digest, drops=drops_by_shard.get(sid), drop_label=drop_label) for sid in alive]
        results = _run_jobs(jobs, config, console, f"phase {phase.index + 1}/{len(phases)}", in_fs)
        for sid, res in results.items():
            if "corrupt" in res:
                corrupt[f"{sid:05d}"] = res["corrupt"]
            elif "failed" in res:
                failed[f"{sid:05d}"] = res["failed"]
            else:
                for label, s in res["steps"].items():
                    _add_stats(step_stats[label], s)
                if final:
                    final_stats[sid] = res["shard_stats"]
        alive = [sid for sid in alive if "corrupt" not in results[sid] and "failed" not in results[sid]]
        timings.append({"phase": phase.index, "steps": [label for label, _ in phase.row_steps],
                        "shard_tasks_s": round(time.time() - t_phase, 3)})
        if phase.dedup is not None:
            label, step = phase.dedup
            t0 = time.time()
            refs = [SignatureRef(sid, f"{work_dir}/{sid:05d}.sig.npz", results[sid]["rows_out"]) for sid in alive]
            dups = _find_duplicates(step, refs, parts, f"{work_dir}/dups-{phase.dedup_digest[:16]}.parquet")
            step_stats[label]["seconds"] += time.time() - t0
            timings[-1].update(dedup=label, find_duplicates_s=round(time.time() - t0, 3))
            drops_by_shard = _drops_by_shard(dups)
            drop_label = label

    removed = _merge_removed(out, phases, work_root, alive)
    elapsed = time.time() - started
    stats = {
        "input": {"path": config.input, "digest": manifest["digest"], "shards": len(entries),
                  "samples": manifest.get("samples"), "corrupt_shards": corrupt, "failed_shards": failed},
        "output": {"path": config.output, "shards": len(final_stats),
                   "samples": sum(s["samples"] for s in final_stats.values())},
        "elapsed_s": round(elapsed, 3),
        "steps": [{"step": label, **_rounded(step_stats[label])} for label, _ in labelled],
        "phases": timings,
    }
    out.write_bytes(STATS, json.dumps(stats, indent=2).encode())
    if config.report:
        _write_report(out, stats, kind, removed)
    new_manifest = write_manifest(
        out, kind, config.model_dump(mode="json"), config.digest(), list(final_stats.values()),
        {"elapsed_s": stats["elapsed_s"], "samples_in": stats["input"]["samples"],
         "samples_out": stats["output"]["samples"], "corrupt_shards": len(corrupt), "failed_shards": len(failed)},
        extra={"run_digest": run_digest, "input": {"path": config.input, "digest": manifest["digest"],
                                                   "kind": kind}})
    result = CurateResult(new_manifest, stats, failed_shards=failed)
    if not config.quiet:
        print_summary(console, config.output, stats)
    return result


# Planning ----------------------------------------------------------------------------------------

def _read_input_manifest(fs: Any, root: str, url: str) -> dict[str, Any]:
    path = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        with fs.open(path, "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise PipelineError(f"{url}: no {MANIFEST}; expected the output folder of `pipelines crawl` or `curate`") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{url}/{MANIFEST}: unreadable ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) or "digest" not in manifest:
        raise PipelineError(f"{url}/{MANIFEST}: not a shard manifest (no `shards` list or `digest`)")
    return manifest


def _build_steps(specs: list[dict[str, Any]], manifest: dict[str, Any], fs: Any, root: str) -> list[tuple[str, Step]]:
    steps = [build_step(spec, i) for i, spec in enumerate(specs)]
    if not steps:
        raise PipelineError("no curation steps configured (set `steps:` in the --config YAML)")
    base = {"key", "text"} | ({"image"} if manifest.get("kind") == "images" else set())
    for s in manifest["shards"][:1]:
        try:
            base |= set(pq.read_schema(fs.open(f"{root.rstrip('/')}/{s['parquet']}", "rb")).names)
        except (OSError, pa.ArrowInvalid):
            pass  # reported as a corrupt shard when it is read
    labelled: list[tuple[str, Step]] = []
    seen: Counter = Counter()
    for i, step in enumerate(steps):
        # Columns added by earlier steps are only known when they run; check against the shards'.
        if not any(type(s).score is not Step.score for _, s in labelled):
            missing = [c for c in step.required_columns() if c not in base]
            if missing:
                raise PipelineError(f"steps[{i}] ({step.name}) needs column(s) {', '.join(missing)}; "
                                    f"the shards have: {', '.join(sorted(base))}")
        seen[step.name] += 1
        labelled.append((step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}", step))
    return labelled


def _step_digest(step: Step, full: bool) -> str:
    params = step.params.model_dump(mode="json") if full else step.params.score_digest()
    return json.dumps([type(step).__module__, type(step).__qualname__, params], sort_keys=True)


def _plan(labelled: list[tuple[str, Step]], run_digest: str, input_digest: str) -> list[Phase]:
    """Cut the steps into phases at each dedup; digest each phase by all it depends on."""
    phases: list[Phase] = []
    chain = f"{input_digest} {__version__}"
    current: list[tuple[str, Step]] = []
    for label, step in labelled:
        if isinstance(step, DedupStep):
            chain = _sha(chain, *(_step_digest(s, True) for _, s in current), _step_digest(step, False))
            phases.append(Phase(len(phases), current, (label, step), chain, _sha(chain, _step_digest(step, True))))
            chain = phases[-1].dedup_digest
            current = []
        else:
            current.append((label, step))
    phases.append(Phase(len(phases), current, None, _sha(chain, *(_step_digest(s, True) for _, s in current))))
    return phases


def _sha(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _ship_by_value(cls: type) -> None:
    """Steps from outside this package travel to Ray workers by value, so a cluster need not have them installed."""
    module = sys.modules.get(cls.__module__)
    if module is not None and not cls.__module__.startswith("pipelines."):
        cloudpickle.register_pickle_by_value(module)


# Running shard tasks -----------------------------------------------------------------------------

def _run_jobs(jobs: list[ShardJob], config: CurateConfig, console: Console, title: str, fs: Any) -> dict[int, dict]:
    """Run one phase's shard tasks (skipping those already done); return each shard's result."""
    results: dict[int, dict] = {}
    todo = []
    for job in jobs:
        done = _done_result(job)
        if done is not None:
            results[job.shard] = done
        else:
            todo.append(job)
    if not todo:
        return results
    phase = todo[0].phase
    steps = [s for _, s in phase.row_steps] + ([phase.dedup[1]] if phase.dedup else [])
    remote = ray.remote(run_shard).options(
        num_cpus=max([s.num_cpus for s in steps] + [1]), num_gpus=max([s.num_gpus for s in steps] + [0]),
        max_retries=config.task_retries, retry_exceptions=False)
    max_in_flight = config.max_in_flight or 2 * cluster_cpus()
    pending: dict[Any, int] = {}
    progress = Progress(TextColumn(f"[bold]curate {title}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("shards"), TimeElapsedColumn(), console=console, disable=config.quiet)
    with progress:
        bar = progress.add_task("", total=len(jobs), completed=len(results))
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                job = queue.pop(0)
                pending[remote.remote(job)] = job.shard
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                sid = pending.pop(ref)
                try:
                    results[sid] = ray.get(ref)
                except PipelineError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failed shard does not stop the others
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, PipelineError):
                        raise cause from None
                    results[sid] = {"failed": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"}
                progress.update(bar, completed=len(results))
    return results


def _done_result(job: ShardJob) -> dict | None:
    """The result of a shard task that already ran with the same inputs, if its files are all there."""
    fs, _ = filesystem(job.work_dir)
    marker = _output_stats_path(job) if job.final else f"{job.work_dir}/{job.shard:05d}.result.json"
    try:
        with fs.open(marker, "rb") as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    if job.final:
        if data.get("config_digest") != job.run_digest:
            return None
        return data.get("curate_result")
    return data


def _output_stats_path(job: ShardJob) -> str:
    _, root = filesystem(job.output)
    return f"{root.rstrip('/')}/{shard_files(job.shard)[2]}"


def run_shard(job: ShardJob) -> dict[str, Any]:
    """One shard through one phase (in a Ray worker)."""
    started = time.time()
    fs, _ = filesystem(job.work_dir)
    step_stats: dict[str, dict[str, Any]] = {}
    removed: list[pd.DataFrame] = []
    try:
        batch, rows_in, read_removed = _read_source(job, fs)
    except CorruptShard as exc:
        return {"corrupt": str(exc)}
    if read_removed is not None:
        removed.append(read_removed)
    if job.drops is not None and len(job.drops["row"]):
        batch, gone = _apply_drops(batch, job.drops, job.drop_label)
        removed.append(gone)
        step_stats[job.drop_label] = {"in": len(batch) + len(gone), "kept": len(batch),
                                      "dropped": dict(Counter(gone["reason"])), "seconds": 0.0}
    elif job.drop_label is not None:
        step_stats[job.drop_label] = {"in": len(batch), "kept": len(batch), "dropped": {}, "seconds": 0.0}
    score_columns: list[str] = [c for c in batch.columns if c.startswith("_score:")]
    chain = job.input_sha256 or ""
    for label, step in job.phase.row_steps:
        t0 = time.time()
        n_in = len(batch)
        scores = _scores(step, label, batch, job, fs, chain)
        if type(step).transform is not Step.transform:
            chain = _sha(chain, _step_digest(step, False))
        for name in scores.columns:
            batch[name] = scores[name].to_numpy()
            if name not in score_columns:
                score_columns.append(name)
        batch = step.transform(batch) if len(batch) else batch
        why = step.drop(batch) if len(batch) else None
        if why is not None and len(batch):
            why = pd.Series(why, index=batch.index)
            dropped = why.notna()
            if dropped.any():
                gone = batch[dropped]
                removed.append(_removal_rows(gone, label, why[dropped].astype(str), score_columns))
                batch = batch[~dropped].reset_index(drop=True)
            counts = dict(Counter(why[dropped].astype(str)))
        else:
            counts = {}
        step_stats[label] = {"in": n_in, "kept": len(batch), "dropped": counts, "seconds": time.time() - t0}

    result: dict[str, Any] = {"steps": step_stats, "rows_out": len(batch)}
    fs.makedirs(job.work_dir, exist_ok=True)
    _write_parquet(fs, f"{job.work_dir}/{job.shard:05d}.removed.parquet",
                   pd.concat(removed, ignore_index=True) if removed else pd.DataFrame(columns=REMOVED_SCHEMA.names),
                   REMOVED_SCHEMA)
    if job.final:
        result["shard_stats"] = _write_output_shard(job, batch, rows_in, started, result)
        return result
    if job.phase.dedup is not None:
        label, step = job.phase.dedup
        t0 = time.time()
        # A global step may score its rows first (cached per row, as for row steps); the columns stay on the rows.
        scores = _scores(step, label, batch, job, fs, chain)
        for name in scores.columns:
            batch[name] = scores[name].to_numpy()
        sig = step.signature(batch) if len(batch) else _empty_signature(step)
        sig["gid"] = (np.int64(job.shard) << SHARD_BITS) + np.arange(len(batch), dtype=np.int64)
        sig["key"] = np.array(batch["key"].astype(str).tolist(), dtype="S") if len(batch) else np.zeros(0, "S1")
        sig["priority"] = step.priority(batch) if len(batch) else np.zeros(0)
        buf = io.BytesIO()
        np.savez(buf, **sig)
        _put(fs, f"{job.work_dir}/{job.shard:05d}.sig.npz", buf.getvalue())
        # Only the time here: rows in, kept and dropped are counted where the duplicates are dropped.
        step_stats[label] = {"in": 0, "kept": 0, "dropped": {}, "seconds": time.time() - t0}
    _write_parquet(fs, f"{job.work_dir}/{job.shard:05d}.parquet", batch, None)
    _put(fs, f"{job.work_dir}/{job.shard:05d}.result.json", json.dumps(result).encode())
    return result


class CorruptShard(Exception):
    pass


def _read_source(job: ShardJob, fs: Any) -> tuple[pd.DataFrame, int, pd.DataFrame | None]:
    """The rows a phase starts from: the input shard's samples (phase 0) or the previous phase's."""
    kind, path = job.source
    if kind == "work":
        with fs.open(path, "rb") as f:
            batch = pq.read_table(f).to_pandas()
        return batch, len(batch), None
    in_fs, _ = filesystem(path)
    try:
        data = in_fs.cat_file(path)
        if job.input_sha256 and hashlib.sha256(data).hexdigest() != job.input_sha256:
            raise CorruptShard(f"{os.path.basename(path)}: sha256 differs from the manifest (truncated or changed)")
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        with in_fs.open(job.input_parquet, "rb") as f:
            meta = pq.read_table(f).to_pandas()
    except CorruptShard:
        raise
    except (OSError, tarfile.TarError, pa.ArrowException, EOFError) as exc:
        raise CorruptShard(f"{os.path.basename(path)}: {type(exc).__name__}: {exc}") from exc
    rows_in = len(meta)
    if "status" in meta:
        meta = meta[meta["status"] == "success"].reset_index(drop=True)
    present = meta["key"].isin(samples.keys())
    missing = meta[~present]
    meta = meta[present].reset_index(drop=True)
    files = [samples[k] for k in meta["key"]]
    if job.kind == "images":
        ext = [next((e for e in IMAGE_EXTS if e in f), None) for f in files]
        meta["image"] = [f.get(e) if e else None for f, e in zip(files, ext, strict=True)]
        meta["image_ext"] = ext
        meta["text"] = [f["txt"].decode("utf-8", "replace") if "txt" in f else "" for f in files]
    else:
        meta["text"] = [f.get("txt", b"").decode("utf-8", "replace") for f in files]
    gone = None
    if len(missing):
        gone = _removal_rows(missing.assign(text=""), "read", pd.Series(["missing_sample"] * len(missing),
                                                                          index=missing.index), [])
    return meta, rows_in, gone


def _apply_drops(batch: pd.DataFrame, drops: dict[str, np.ndarray], label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = drops["row"]
    gone = batch.iloc[rows]
    log = _removal_rows(gone, label, pd.Series(drops["reason"], index=gone.index), [])
    log["cluster_id"] = drops["cluster"]
    log["kept_key"] = drops["kept_key"]
    log["similarity"] = drops["similarity"]
    keep = np.ones(len(batch), bool)
    keep[rows] = False
    return batch[keep].reset_index(drop=True), log


def _scores(step: Step, label: str, batch: pd.DataFrame, job: ShardJob, fs: Any, chain: str) -> pd.DataFrame:
    """The step's score columns for the batch: from the cache for rows scored before, computed for the rest."""
    if type(step).score is Step.score or not len(batch):
        return pd.DataFrame(index=batch.index)
    digest = _sha(chain, _step_digest(step, False))[:16]
    path = f"{job.score_dir}/{label}-{digest}/{job.shard:05d}.parquet"
    cached = None
    try:
        with fs.open(path, "rb") as f:
            cached = pq.read_table(f).to_pandas().set_index("key")
    except (FileNotFoundError, pa.ArrowException):
        pass
    keys = batch["key"].astype(str)
    if cached is not None and keys.isin(cached.index).all():
        return cached.loc[keys].set_index(batch.index)
    todo = batch if cached is None else batch[~keys.isin(cached.index)]
    fresh = step.score(todo)
    fresh = pd.DataFrame(fresh, index=todo.index) if not isinstance(fresh, pd.DataFrame) else fresh.set_index(todo.index)
    fresh.insert(0, "key", keys[todo.index])
    table = fresh.set_index("key") if cached is None else pd.concat([cached, fresh.set_index("key")])
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    _write_parquet(fs, path, table.reset_index(), None)
    return table.loc[keys].set_index(batch.index)


def _removal_rows(gone: pd.DataFrame, label: str, why: pd.Series, score_columns: list[str]) -> pd.DataFrame:
    scores = gone[score_columns].to_dict("records") if score_columns else [{}] * len(gone)
    text = gone["text"] if "text" in gone else pd.Series([""] * len(gone), index=gone.index)
    return pd.DataFrame({
        "key": gone["key"].astype(str).to_numpy(), "step": label, "reason": why.astype(str).to_numpy(),
        "cluster_id": None, "kept_key": None, "similarity": np.nan,
        "scores": [json.dumps(s, default=_json_default) for s in scores],
        "chars": text.fillna("").str.len().to_numpy(),
        "width": _int_column(gone, "original_width", "width"), "height": _int_column(gone, "original_height", "height"),
    })


def _int_column(frame: pd.DataFrame, *names: str) -> Any:
    for name in names:
        if name in frame:
            return pd.to_numeric(frame[name], errors="coerce").astype("Int64").to_numpy()
    return pd.array([None] * len(frame), dtype="Int64")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return str(value)


def _empty_signature(step: DedupStep) -> dict[str, np.ndarray]:
    sig = step.signature(pd.DataFrame({c: pd.Series([], dtype=object) for c in ("key", "text", "image", "sha256")}))
    return sig


def _write_parquet(fs: Any, path: str, frame: pd.DataFrame, schema: pa.Schema | None) -> None:
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _put(fs, path, buf.getvalue())


def _put(fs: Any, path: str, data: bytes) -> None:
    """Write whole (a temporary renamed into place on local disks; one PUT on object stores)."""
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    if fs.protocol in ("file", ("file", "local")) or "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _write_output_shard(job: ShardJob, batch: pd.DataFrame, rows_in: int, started: float,
                        result: dict[str, Any]) -> dict[str, Any]:
    out = ShardOutput(job.output)
    writer = ShardWriter(out, job.shard)
    meta_columns = [c for c in batch.columns if c not in ("text", "image", "image_ext")]
    if job.kind == "images" and "caption" in batch:
        batch["caption"] = batch["text"].where(batch["caption"].notna() | (batch["text"] != ""), None)
    try:
        records = batch[meta_columns].to_dict("records")
        for i, meta in enumerate(records):
            files: dict[str, bytes] = {}
            if job.kind == "images":
                if batch["image"].iat[i] is not None:
                    files[batch["image_ext"].iat[i]] = batch["image"].iat[i]
                if batch["text"].iat[i]:
                    files["txt"] = batch["text"].iat[i].encode()
            else:
                files["txt"] = batch["text"].iat[i].encode()
            files["json"] = json.dumps(meta, default=_json_default).encode()
            writer.add(str(meta["key"]), files)
        table = pa.Table.from_pandas(batch[meta_columns], preserve_index=False)
        stats = {"config_digest": job.run_digest, "count": rows_in, "successes": len(batch),
                 "status": {"success": len(batch)}, "start_time": started, "end_time": time.time(),
                 "duration": round(time.time() - started, 3), "curate_result": None}
        stats["curate_result"] = {**result, "shard_stats": None}
        written = writer.close(table, stats)
    except BaseException:
        writer.abort()
        raise
    written["curate_result"]["shard_stats"] = {k: v for k, v in written.items() if k != "curate_result"}
    return written["curate_result"]["shard_stats"]


# Dedup on the driver -----------------------------------------------------------------------------

def _find_duplicates(step: DedupStep, refs: list[SignatureRef], parts: int, path: str) -> Duplicates:
    """The step's duplicates, cached by everything that decides them."""
    fs, _ = filesystem(path)
    try:
        with fs.open(path, "rb") as f:
            t = pq.read_table(f).to_pandas()
        return Duplicates(t["gid"].to_numpy(np.int64), t["cluster"].tolist(), t["kept_key"].tolist(),
                          t["reason"].tolist(), t["similarity"].tolist())
    except (FileNotFoundError, pa.ArrowException):
        pass
    dups = step.find_duplicates(refs, parts) if refs else Duplicates(np.zeros(0, np.int64), [], [], [], [])
    _write_parquet(fs, path, pd.DataFrame({"gid": dups.gid, "cluster": dups.cluster, "kept_key": dups.kept_key,
                                           "reason": dups.reason, "similarity": dups.similarity}), None)
    return dups


def _drops_by_shard(dups: Duplicates) -> dict[int, dict[str, np.ndarray]]:
    shard = (dups.gid >> SHARD_BITS).astype(np.int64)
    row = (dups.gid & ((1 << SHARD_BITS) - 1)).astype(np.int64)
    cluster = np.array(dups.cluster, dtype=object)
    kept = np.array(dups.kept_key, dtype=object)
    reason = np.array(dups.reason, dtype=object)
    sim = np.array(dups.similarity, dtype=np.float64)
    out = {}
    for sid in np.unique(shard):
        sel = np.flatnonzero(shard == sid)
        out[int(sid)] = {"row": row[sel], "cluster": cluster[sel], "kept_key": kept[sel],
                         "reason": reason[sel], "similarity": sim[sel]}
    return out


# Outputs -----------------------------------------------------------------------------------------

def _empty_stats() -> dict[str, Any]:
    return {"in": 0, "kept": 0, "dropped": Counter(), "seconds": 0.0}


def _add_stats(total: dict[str, Any], shard: dict[str, Any]) -> None:
    total["in"] += shard["in"]
    total["kept"] += shard["kept"]
    total["dropped"].update(shard["dropped"])
    total["seconds"] += shard["seconds"]


def _rounded(s: dict[str, Any]) -> dict[str, Any]:
    return {"in": s["in"], "kept": s["kept"], "dropped": dict(sorted(s["dropped"].items())),
            "seconds": round(s["seconds"], 3)}


def _merge_removed(out: ShardOutput, phases: list[Phase], work_root: str, shards: list[int]) -> pd.DataFrame:
    fs = out.fs
    frames = []
    for phase in phases:
        for sid in shards:
            path = f"{work_root}/p{phase.index}-{phase.digest[:16]}/{sid:05d}.removed.parquet"
            if fs.exists(path):
                with fs.open(path, "rb") as f:
                    frames.append(pq.read_table(f))
    table = pa.concat_tables(frames) if frames else REMOVED_SCHEMA.empty_table()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_bytes(REMOVED, buf.getvalue())
    return table.to_pandas()


def _write_report(out: ShardOutput, stats: dict[str, Any], kind: str, removed: pd.DataFrame) -> None:
    from pipelines.curate.report import write_report

    kept = []
    for sid in sorted(out.done_shards()):
        kept.append(out.read_parquet(shard_files(sid)[1]).to_pandas())
    frame = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame()
    if kind == "images" and "caption" in frame and "chars" not in frame:
        frame["chars"] = frame["caption"].fillna("").str.len()
    staged = out.staging(REPORT)
    write_report(staged, f"Curation report: {stats['output']['path']}", stats, frame, removed)
    out.commit(staged, REPORT)


def print_summary(console: Console, output: str, stats: dict[str, Any]) -> None:
    table = Table(title=f"curate: {output}")
    for col, justify in (("step", "left"), ("in", "right"), ("kept", "right"), ("dropped", "left"), ("s", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in stats["steps"]:
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
        table.add_row(s["step"], str(s["in"]), str(s["kept"]), dropped or "-", f"{s['seconds']:.1f}")
    console.print(table)
    inp, outp = stats["input"], stats["output"]
    console.print(f"{inp['samples']} samples in {inp['shards']} shards -> {outp['samples']} kept in "
                  f"{outp['shards']} shards · {stats['elapsed_s']:.1f}s")
    for name, why in sorted(inp["corrupt_shards"].items()):
        console.print(f"[yellow]shard {name} skipped (corrupt): {why}[/yellow]")
    for name, why in sorted(inp["failed_shards"].items()):
        console.print(f"[red]shard {name} failed: {why}[/red] (rerun the same command to resume)")
