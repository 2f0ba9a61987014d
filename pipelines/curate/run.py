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
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import cloudpickle
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipelines import __version__
from pipelines.curate.config import CurateConfig
from pipelines.curate.dedup import SHARD_BITS
from pipelines.curate.registry import build_step
from pipelines.curate.step import DedupStep, Duplicates, SignatureRef, Step, code_digest, scoring
from pipelines.errors import PipelineError
from pipelines.runtime import cluster_cpus, filesystem, init_ray
from pipelines.shards import (MANIFEST, TAR_ERRORS, ShardOutput, ShardWriter, absolute, image_of, owned,
                              read_manifest, shard_files, tar_samples, url_of, write_file, write_manifest)

REMOVED = "removed.parquet"
STATS = "stats.json"
REPORT = "report.html"
REMOVED_SCHEMA = pa.schema([
    ("key", pa.string()), ("step", pa.string()), ("reason", pa.string()), ("cluster_id", pa.string()),
    ("kept_key", pa.string()), ("similarity", pa.float64()), ("scores", pa.string()), ("chars", pa.int64()),
    ("width", pa.int64()), ("height", pa.int64()),
])


@dataclass
class CurateResult:
    manifest: dict[str, Any]
    stats: dict[str, Any]
    up_to_date: bool = False
    failed_shards: dict[str, str] = field(default_factory=dict)
    skipped_shards: dict[str, str] = field(default_factory=dict)  # corrupt input shards, left out
    allow_skipped_shards: bool = False

    @property
    def ok(self) -> bool:
        """No shard failed, and none was skipped unless the run was told to accept that loss."""
        return not self.failed_shards and (self.allow_skipped_shards or not self.skipped_shards)


@dataclass
class Phase:
    index: int
    row_steps: list[tuple[str, Step]]
    dedup: tuple[str, DedupStep] | None
    digest: str  # of everything that decides this phase's work files
    keys: dict[str, StepKey]  # every step's cache identity, by label
    dedup_digest: str | None = None  # and of the dedup's result (its thresholds too)


@dataclass(frozen=True)
class StepKey:
    """A step's cache identity, computed on the driver (where its module's source is): `score` keys
    what it caches per row (code and every parameter but thresholds), `full` what it decides (code
    and every parameter)."""

    score: str
    full: str


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
    force: bool = False  # recompute, whatever the caches hold


def curate(config: CurateConfig) -> CurateResult:
    """Curate the shards of `config.input` with `config.steps` into `config.output`, holding the output
    for the run (a second run into it is refused)."""
    started = time.time()
    in_fs, in_root = filesystem(config.input)
    manifest = read_manifest(config.input)
    labelled = _build_steps(config.steps, manifest, in_fs, in_root)
    out = ShardOutput(config.output)  # only once the config holds: a mistake leaves no output folder behind
    with owned(out):
        return _curate(config, out, manifest, labelled, started)


def _curate(config: CurateConfig, out: ShardOutput, manifest: dict[str, Any], labelled: list[tuple[str, Step]],
            started: float) -> CurateResult:
    console = Console(stderr=True, quiet=config.quiet)
    in_fs, in_root = filesystem(config.input)
    keys = {label: _step_key(step) for label, step in labelled}
    # The run's identity: config, input, and code (the package, curate's own modules, every step's module).
    run_digest = _sha(config.digest(), manifest["digest"], __version__, _core_digest(),
                      *(keys[label].full for label, _ in labelled))
    if out.fs.exists(out.path(MANIFEST)) and not config.force:
        previous = out.read_json(MANIFEST)
        previous_stats = out.read_json(STATS) if out.fs.exists(out.path(STATS)) else {}
        # A run that had failed shards is resumed, never taken as done.
        if previous.get("run_digest") == run_digest and not previous_stats.get("input", {}).get("failed_shards"):
            console.print(f"{config.output}: up to date (same input, config and code); nothing to do")
            result = CurateResult(previous, previous_stats, up_to_date=True,
                                  skipped_shards=previous_stats["input"]["corrupt_shards"],
                                  allow_skipped_shards=config.allow_skipped_shards)
            _report_skipped(console, result)
            return result
    # The shards are about to change: no stale manifest beside them, no shard of another run among them.
    out.remove_shards(keep=lambda stats: stats.get("config_digest") == run_digest)

    phases = _plan(labelled, keys, manifest["digest"])
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
            run_digest=run_digest, drops=drops_by_shard.get(sid), drop_label=drop_label, force=config.force)
            for sid in alive]
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
            dups = _find_duplicates(step, refs, parts, f"{work_dir}/dups-{phase.dedup_digest[:16]}.parquet",
                                    config.force)
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
        extra={"run_digest": run_digest, "input": {"path": absolute(config.input), "digest": manifest["digest"],
                                                   "kind": kind}})
    result = CurateResult(new_manifest, stats, failed_shards=failed, skipped_shards=corrupt,
                          allow_skipped_shards=config.allow_skipped_shards)
    if not config.quiet:
        print_summary(console, config.output, stats)
    _report_skipped(console, result)
    return result


def _report_skipped(console: Console, result: CurateResult) -> None:
    """Skipped input shards fail the run unless it was told to accept them: say so, even when quiet."""
    if result.skipped_shards and not result.allow_skipped_shards:
        Console(stderr=True).print(
            f"[red]{len(result.skipped_shards)} corrupt input shard(s) skipped "
            f"({', '.join(sorted(result.skipped_shards))}); their samples are not in the output. "
            "Rerun with --allow-skipped-shards to accept the loss.[/red]", highlight=False)


# Planning ----------------------------------------------------------------------------------------

def _build_steps(specs: list[dict[str, Any]], manifest: dict[str, Any], fs: Any, root: str) -> list[tuple[str, Step]]:
    steps = [build_step(spec, i) for i, spec in enumerate(specs)]
    if not steps:
        raise PipelineError("no curation steps configured (set `steps:` in the --config YAML)")
    base = {"key", "text"} | ({"image", "image_ext"} if manifest.get("kind") == "images" else set())
    schema = _first_schema(manifest, fs, root)
    if schema is None:
        return _labelled(steps)  # no readable shard: every one is reported as corrupt when it is read
    base |= set(schema.names)
    # Each step's columns against the shards' and those the steps before it add. A step that does not
    # declare what it adds (`adds`) leaves the later ones to the check before each batch (`_check_columns`).
    available, added, undeclared = set(base), [], False
    for i, step in enumerate(steps):
        missing = [c for c in step.required_columns() if c not in available]
        if missing and not undeclared:
            raise PipelineError(f"steps[{i}] ({step.name}) needs column(s) {', '.join(missing)}; "
                                f"the shards have: {', '.join(sorted(base))}"
                                + (f"; earlier steps add: {', '.join(added)}" if added else ""))
        adds = step.added_columns()
        undeclared = undeclared or adds is None
        available |= set(adds or ())
        added += [c for c in adds or () if c not in added]
    return _labelled(steps)


def _first_schema(manifest: dict[str, Any], fs: Any, root: str) -> pa.Schema | None:
    """The metadata schema of the first input shard whose parquet reads."""
    for s in manifest["shards"]:
        try:
            with fs.open(f"{root.rstrip('/')}/{s['parquet']}", "rb") as f:
                return pq.read_schema(f)
        except (OSError, pa.ArrowInvalid):
            continue
    return None


def _labelled(steps: list[Step]) -> list[tuple[str, Step]]:
    """Each step with its label: its name, numbered from the second use on (`length#2`)."""
    labelled: list[tuple[str, Step]] = []
    seen: Counter = Counter()
    for step in steps:
        seen[step.name] += 1
        labelled.append((step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}", step))
    return labelled


def _step_key(step: Step) -> StepKey:
    """The step's cache identity: its class, its code (`code_digest`) and its parameters."""
    cls = type(step)
    ident = (cls.__module__, cls.__qualname__, code_digest(cls))
    return StepKey(score=_sha(*ident, step.params.score_digest()),
                   full=_sha(*ident, json.dumps(step.params.model_dump(mode="json"), sort_keys=True)))


def _core_digest() -> str:
    """sha256 of curate's own code: this module, the step API, the dedup engine and the shard format."""
    from pipelines import shards
    from pipelines.curate import dedup, step

    return _sha(*(hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
                  for m in (sys.modules[__name__], step, dedup, shards)))


def _plan(labelled: list[tuple[str, Step]], keys: dict[str, StepKey], input_digest: str) -> list[Phase]:
    """Cut the steps into phases at each dedup; digest each phase by all it depends on."""
    phases: list[Phase] = []
    chain = _sha(input_digest, __version__, _core_digest())
    current: list[tuple[str, Step]] = []
    for label, step in labelled:
        if isinstance(step, DedupStep):
            chain = _sha(chain, *(keys[lb].full for lb, _ in current), keys[label].score)
            phases.append(Phase(len(phases), current, (label, step), chain, keys, _sha(chain, keys[label].full)))
            chain = phases[-1].dedup_digest
            current = []
        else:
            current.append((label, step))
    phases.append(Phase(len(phases), current, None, _sha(chain, *(keys[lb].full for lb, _ in current)), keys))
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
                except Exception as exc:  # noqa: BLE001 - one failed shard does not stop the others
                    # A user's mistake met in a task (a step's bad column or code) stops the run, in one line:
                    # the error itself, not Ray's wrapper with the worker's traceback.
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, PipelineError):
                        raise cause from None
                    results[sid] = {"failed": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"}
                progress.update(bar, completed=len(results))
    return results


def _done_result(job: ShardJob) -> dict | None:
    """The result of a shard task that already ran with the same inputs, if its files are all there."""
    if job.force:
        return None
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
        _check_columns(step, label, batch)
        scores = _scores(step, label, batch, job, fs, chain)
        if type(step).transform is not Step.transform:
            # Later scores are of the rewritten rows: keyed by all that rewrote them (any parameter may).
            chain = _sha(chain, job.phase.keys[label].full)
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
        _check_columns(step, label, batch)
        # A global step may score its rows first (cached per row, as for row steps); the columns stay on the rows.
        scores = _scores(step, label, batch, job, fs, chain)
        for name in scores.columns:
            batch[name] = scores[name].to_numpy()
        # Signatures and priorities are cached with the phase, keyed without thresholds, as scores are.
        with scoring(step):
            sig = step.signature(batch) if len(batch) else _empty_signature(step)
            sig["priority"] = step.priority(batch) if len(batch) else np.zeros(0)
        sig["gid"] = (np.int64(job.shard) << SHARD_BITS) + np.arange(len(batch), dtype=np.int64)
        sig["key"] = np.array(batch["key"].astype(str).tolist(), dtype="S") if len(batch) else np.zeros(0, "S1")
        buf = io.BytesIO()
        np.savez(buf, **sig)
        write_file(fs, f"{job.work_dir}/{job.shard:05d}.sig.npz", buf.getvalue())
        # Only the time here: rows in, kept and dropped are counted where the duplicates are dropped.
        step_stats[label] = {"in": 0, "kept": 0, "dropped": {}, "seconds": time.time() - t0}
    _write_parquet(fs, f"{job.work_dir}/{job.shard:05d}.parquet", batch, None)
    write_file(fs, f"{job.work_dir}/{job.shard:05d}.result.json", json.dumps(result).encode())
    return result


def _check_columns(step: Step, label: str, batch: pd.DataFrame) -> None:
    """The columns a step reads, on the rows it is about to see (those an undeclared step adds are only
    known here: see `_build_steps`). An empty batch has no score columns and is not checked."""
    missing = [c for c in step.required_columns() if c not in batch.columns]
    if missing and len(batch):
        raise PipelineError(f"step {label} needs column(s) {', '.join(missing)}; its rows have: "
                            f"{', '.join(sorted(map(str, batch.columns)))}")


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
        samples = tar_samples(io.BytesIO(data))
        with in_fs.open(job.input_parquet, "rb") as f:
            meta = pq.read_table(f).to_pandas()
    except CorruptShard:
        raise
    except (*TAR_ERRORS, pa.ArrowException) as exc:
        raise CorruptShard(f"{os.path.basename(path)}: {type(exc).__name__}: {exc}") from exc
    rows_in = len(meta)
    if "status" in meta:
        meta = meta[meta["status"] == "success"].reset_index(drop=True)
    present = meta["key"].isin(samples.keys())
    missing = meta[~present]
    meta = meta[present].reset_index(drop=True)
    files = [samples[k] for k in meta["key"]]
    if job.kind == "images":
        images = [image_of(f) or (None, None) for f in files]
        meta["image"] = [data for _, data in images]
        meta["image_ext"] = [ext for ext, _ in images]
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
    digest = _sha(chain, job.phase.keys[label].score)[:16]
    path = f"{job.score_dir}/{label}-{digest}/{job.shard:05d}.parquet"
    cached = None
    try:
        if not job.force:
            with fs.open(path, "rb") as f:
                cached = pq.read_table(f).to_pandas().set_index("key")
    except (FileNotFoundError, pa.ArrowException):
        pass
    keys = batch["key"].astype(str)
    if cached is not None and keys.isin(cached.index).all():
        return cached.loc[keys].set_index(batch.index)
    todo = batch if cached is None else batch[~keys.isin(cached.index)]
    with scoring(step):
        fresh = step.score(todo)
    fresh = pd.DataFrame(fresh, index=todo.index) if not isinstance(fresh, pd.DataFrame) else fresh.set_index(todo.index)
    declared = step.added_columns()
    if declared is not None and sorted(fresh.columns) != sorted(declared):
        raise PipelineError(f"step {label}: score() returned column(s) {', '.join(map(str, fresh.columns))} "
                            f"but declares adds = {declared}")
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
        "scores": [_json(s) for s in scores],
        "chars": text.fillna("").str.len().to_numpy(),
        "width": _int_column(gone, "original_width", "width"), "height": _int_column(gone, "original_height", "height"),
    })


def _int_column(frame: pd.DataFrame, *names: str) -> Any:
    for name in names:
        if name in frame:
            return pd.to_numeric(frame[name], errors="coerce").astype("Int64").to_numpy()
    return pd.array([None] * len(frame), dtype="Int64")


def _json(value: Any) -> str:
    """Strict JSON (no bare NaN or Infinity: those are null), as every JSON reader takes it."""
    return json.dumps(_json_value(value), allow_nan=False, default=str)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(v) for v in value]
    return value


def _metadata_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """The rows' metadata as a table typed as the input shard's: pandas turns an integer column with
    nulls into floats and nulls into NaN, which this undoes. A score column, or a column a step rewrote
    into another type, gets the type of its values."""
    fields, arrays = [], []
    for name in frame.columns:
        if name in schema.names:
            try:
                arrays.append(pa.array(frame[name], type=schema.field(name).type, from_pandas=True))
                fields.append(schema.field(name))
                continue
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                pass
        values = pa.array(frame[name], from_pandas=True)
        plain = {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}.get(values.type, values.type)
        arrays.append(values.cast(plain))
        fields.append(pa.field(str(name), plain))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


def _input_schema(job: ShardJob) -> pa.Schema:
    fs, _ = filesystem(job.input_parquet)
    with fs.open(job.input_parquet, "rb") as f:
        return pq.read_schema(f)


def _empty_signature(step: DedupStep) -> dict[str, np.ndarray]:
    sig = step.signature(pd.DataFrame({c: pd.Series([], dtype=object) for c in ("key", "text", "image", "sha256")}))
    return sig


def _write_parquet(fs: Any, path: str, frame: pd.DataFrame, schema: pa.Schema | None) -> None:
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_file(fs, path, buf.getvalue())


def _write_output_shard(job: ShardJob, batch: pd.DataFrame, rows_in: int, started: float,
                        result: dict[str, Any]) -> dict[str, Any]:
    out = ShardOutput(job.output)
    writer = ShardWriter(out, job.shard)
    meta_columns = [c for c in batch.columns if c not in ("text", "image", "image_ext")]
    if job.kind == "images" and "caption" in batch:
        batch["caption"] = batch["text"].where(batch["caption"].notna() | (batch["text"] != ""), None)
    try:
        table = _metadata_table(batch[meta_columns], _input_schema(job))
        for i, meta in enumerate(table.to_pylist()):
            files: dict[str, bytes] = {}
            if job.kind == "images":
                if batch["image"].iat[i] is not None:
                    files[batch["image_ext"].iat[i]] = batch["image"].iat[i]
                if batch["text"].iat[i]:
                    files["txt"] = batch["text"].iat[i].encode()
            else:
                files["txt"] = batch["text"].iat[i].encode()
            files["json"] = _json(meta).encode()
            writer.add(str(meta["key"]), files)
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

def _find_duplicates(step: DedupStep, refs: list[SignatureRef], parts: int, path: str, force: bool) -> Duplicates:
    """The step's duplicates, cached by everything that decides them (recomputed when `force`)."""
    fs, _ = filesystem(path)
    if not force:
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
    console.print(f"curate: {output}", soft_wrap=True, highlight=False)  # not a table title: those wrap paths
    table = Table()
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
