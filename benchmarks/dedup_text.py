"""Side-by-side text near-duplicate removal: datatrove 0.10.1 MinHash vs `pipelines curate`, same workload, same machine.

    .venv/bin/python benchmarks/dedup_text.py [--n 40000] [--runs 3] [--datatrove-runs 1] [--workdir .bench/text-dedup]
                                              [--ours-args "..."] [--timeout 1800] [--skip-ours] [--skip-datatrove]

What it does:
  1. Builds the workload with ../shared/workloads/make_text.py into WORKDIR (docs.jsonl + truth.json; skipped when
     WORKDIR/docs.jsonl exists for the same N, see WORKDIR/workload.marker) and splits docs.jsonl into 2 files under
     WORKDIR/datatrove-input (datatrove runs one task per file).
  2. Creates .bench/datatrove-venv (python3.11, datatrove[io,processing]==0.10.1 + spacy, which its English word
     tokenizer needs) if it is missing.
  3. Ours: ingests docs.jsonl once with `pipelines crawl text` into WORKDIR/shards (timed, reported as "ingest", not
     part of the comparison; reused while the workload is unchanged).
  4. Alternates runs of datatrove (its 4 MinHash stages with its defaults: word 5-grams, 14 buckets x 8 hashes,
     64-bit xxhash; LocalPipelineExecutor with 2 workers, 2 tasks for signatures and filter, 1 per bucket) and of
     `pipelines curate --config configs/curate/text-dedup.yaml`, each into a fresh output folder, timing the whole
     process.
  5. Scores each run's set of kept documents (identical sets are scored once):
     - recall per planted edit rate: a planted copy is caught unless both it and its source are kept;
     - precision: of the removed documents, the fraction with a kept document of word-5-gram Jaccard >= 0.5
       (lowercased \\w+ tokens, 5-word windows as a set; a document of < 5 words is one shingle), on all removed
       documents unless --precision-sample is given;
     - ground-truth precision: as precision, but a removed document also counts as correct when it belongs to a
       planted family (a source and its copies) of which another member is kept.
  Prints a markdown table and writes raw per-run figures and medians to WORKDIR/results.json.

Walls are whole-process times. Each run also records the 1-minute load average before and after it: on a shared
machine, other work (a test suite) inflates the walls; both tools run 2 workers, so ~2 is their own share.
"""
import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
DT_VENV = os.path.join(REPO, ".bench", "datatrove-venv")
DT_REQUIREMENTS = ["datatrove[io,processing]==0.10.1", "spacy"]
OURS_BIN = os.path.join(REPO, ".venv", "bin", "pipelines")
OURS_CONFIG = os.path.join(REPO, "configs", "curate", "text-dedup.yaml")
EDIT_RATES = (0.0, 0.02, 0.05, 0.1, 0.3)
JACCARD = 0.5

# Generated into WORKDIR and run with the datatrove venv's python: `python datatrove_minhash.py INPUT_DIR RUN_DIR`.
# It prints one "STAGE name seconds" line per stage.
DATATROVE_SCRIPT = '''\
import sys
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter


def main(input_dir, run_dir):
    config = MinhashConfig()  # defaults: word 5-grams, 14 buckets x 8 hashes, 64-bit xxhash
    stages = {
        "signatures": LocalPipelineExecutor(
            pipeline=[JsonlReader(input_dir), MinhashDedupSignature(f"{run_dir}/signatures", config=config)],
            tasks=2, workers=2, logging_dir=f"{run_dir}/logs/signatures"),
        "buckets": LocalPipelineExecutor(
            pipeline=[MinhashDedupBuckets(f"{run_dir}/signatures", f"{run_dir}/buckets", config=config)],
            tasks=config.num_buckets, workers=2, logging_dir=f"{run_dir}/logs/buckets"),
        "cluster": LocalPipelineExecutor(
            pipeline=[MinhashDedupCluster(f"{run_dir}/buckets", f"{run_dir}/remove_ids", config=config)],
            tasks=1, logging_dir=f"{run_dir}/logs/cluster"),
        "filter": LocalPipelineExecutor(
            pipeline=[JsonlReader(input_dir), MinhashDedupFilter(f"{run_dir}/remove_ids"),
                      JsonlWriter(f"{run_dir}/output")],
            tasks=2, workers=2, logging_dir=f"{run_dir}/logs/filter"),
    }
    for name, executor in stages.items():
        t = time.perf_counter()
        executor.run()
        print(f"STAGE {name} {time.perf_counter() - t:.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
'''


def tail(text, n=30):
    return "\n".join(text.rstrip().splitlines()[-n:])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------- workload + venv


def make_workload(workdir, n):
    """Generate docs.jsonl + truth.json unless present for the same N; split the docs into 2 files for datatrove."""
    marker = os.path.join(workdir, "workload.marker")
    docs = os.path.join(workdir, "docs.jsonl")
    if os.path.exists(docs) and os.path.exists(marker) and open(marker).read().strip() == str(n):
        print(f"workload: reusing {workdir} (N={n})")
        return
    print(f"workload: generating {n} documents into {workdir} ...", flush=True)
    os.makedirs(workdir, exist_ok=True)
    for stale in ("datatrove-input", "shards"):
        shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(SHARED, "workloads", "make_text.py"), workdir, str(n)], check=True)
    split = os.path.join(workdir, "datatrove-input")
    os.makedirs(split)
    lines = open(docs, "rb").readlines()
    half = (len(lines) + 1) // 2
    for part, chunk in enumerate((lines[:half], lines[half:])):
        with open(os.path.join(split, f"part-{part}.jsonl"), "wb") as f:
            f.writelines(chunk)
    print(f"workload: done in {time.perf_counter() - t:.1f}s")
    with open(marker, "w") as f:
        f.write(f"{n}\n")


def ensure_datatrove_venv():
    py = os.path.join(DT_VENV, "bin", "python")
    check = [py, "-c", "import datatrove, orjson, spacy, xxhash"]
    if not (os.path.exists(py) and subprocess.run(check, capture_output=True).returncode == 0):
        print(f"datatrove: creating {DT_VENV} ...", flush=True)
        subprocess.run(["python3.11", "-m", "venv", DT_VENV], check=True)
        proc = subprocess.run([os.path.join(DT_VENV, "bin", "pip"), "install", "-q", *DT_REQUIREMENTS],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"datatrove: pip install failed:\n{tail(proc.stdout + proc.stderr)}")
    versions = subprocess.run(
        [py, "-c", "import importlib.metadata as m, json; "
                   "print(json.dumps({p: m.version(p) for p in ('datatrove', 'spacy', 'xxhash', 'numpy')}))"],
        capture_output=True, text=True, check=True)
    return py, json.loads(versions.stdout)


# ---------------------------------------------------------------------------------------------- timed runs


def timed(cmd, log_path, timeout, cwd=None):
    """Run cmd in its own process group, output to log_path; returns (rc, wall_s, output)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        except OSError as e:
            return None, None, f"could not start {cmd[0]}: {e}"
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    wall = time.perf_counter() - t
    return rc, wall, open(log_path, errors="replace").read()


def run_datatrove(py, workdir, run, timeout):
    """One datatrove run into WORKDIR/out-datatrove-RUN; returns (record, kept ids or None)."""
    script = os.path.join(workdir, "datatrove_minhash.py")
    with open(script, "w") as f:
        f.write(DATATROVE_SCRIPT)
    out = os.path.join(workdir, f"out-datatrove-{run}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = [py, script, os.path.join(workdir, "datatrove-input"), out]
    load_before = os.getloadavg()[0]
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"datatrove-{run}.log"), timeout, cwd=out)
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]],
           "stages_s": {name: float(s) for name, s in re.findall(r"^STAGE (\w+) ([0-9.]+)$", output, re.M)}}
    kept = None
    if rc == 0:
        kept = set()
        for path in glob.glob(os.path.join(out, "output", "*.jsonl*")):
            with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
                kept.update(int(json.loads(line)["id"]) for line in f)
    rec["ok"] = kept is not None and len(rec["stages_s"]) == 4
    if not rec["ok"]:
        print(f"  datatrove run {run} FAILED (rc {rc}); output tail:\n{tail(output)}")
    return rec, kept


def ingest_ours(workdir, timeout):
    """`pipelines crawl text` docs.jsonl -> WORKDIR/shards once; returns (seconds or None when reused, key -> id)."""
    shards = os.path.join(workdir, "shards")
    took = None
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        shutil.rmtree(shards, ignore_errors=True)
        print("ours: ingesting docs.jsonl with `pipelines crawl text` ...", flush=True)
        cmd = [OURS_BIN, "crawl", "text", "--input", os.path.join(workdir, "docs.jsonl"), "--output", shards,
               "--quiet"]
        rc, took, output = timed(cmd, os.path.join(workdir, "logs", "ours-ingest.log"), timeout)
        if rc != 0:
            print(f"  ours ingest FAILED (rc {rc}); output tail:\n{tail(output)}")
            return None, None
        print(f"  ingest {fmt(took)}s")
    key_to_id = {}
    for path in sorted(glob.glob(os.path.join(shards, "[0-9]*.parquet"))):
        for row in pq.read_table(path, columns=["key", "id", "status"]).to_pylist():
            if row["status"] == "success":
                key_to_id[row["key"]] = int(row["id"])
    return took, key_to_id


def run_ours(workdir, run, extra_args, timeout, key_to_id):
    """One `pipelines curate` run into WORKDIR/out-ours-RUN; returns (record, kept ids or None)."""
    out = os.path.join(workdir, f"out-ours-{run}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [OURS_BIN, "curate", "--input", os.path.join(workdir, "shards"), "--output", out,
           "--config", OURS_CONFIG, "--quiet"] + extra_args
    load_before = os.getloadavg()[0]
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"ours-{run}.log"), timeout)
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]]}
    kept = None
    if rc == 0:
        try:
            kept_keys = [k for path in sorted(glob.glob(os.path.join(out, "[0-9]*.parquet")))
                         for k in pq.read_table(path, columns=["key"]).column("key").to_pylist()]
            removed_keys = pq.read_table(os.path.join(out, "removed.parquet"), columns=["key"]).column("key")
            removed_keys = removed_keys.to_pylist()
            kept = {key_to_id[k] for k in kept_keys}
            # consistency: every ingested document is either kept or listed in removed.parquet, once
            rec["removed_listed"] = len(removed_keys)
            rec["unaccounted"] = len(set(key_to_id) - set(kept_keys) - set(removed_keys))
            rec["kept_and_removed"] = len(set(kept_keys) & set(removed_keys))
        except (OSError, KeyError, ValueError) as e:
            output += f"\n[benchmark] could not read kept/removed documents of {out}: {e!r}"
    rec["ok"] = kept is not None
    if not rec["ok"]:
        print(f"  ours run {run} FAILED (rc {rc}); output tail:\n{tail(output)}")
    return rec, kept


# ---------------------------------------------------------------------------------------------- scoring


class Workload:
    """docs.jsonl as word-5-gram shingle sets (sorted unique uint64 arrays) plus the planted ground truth."""

    def __init__(self, workdir):
        t = time.perf_counter()
        word = re.compile(r"\w+")
        vocab = {}
        tokens = []
        with open(os.path.join(workdir, "docs.jsonl")) as f:
            for row, line in enumerate(f):
                doc = json.loads(line)
                if int(doc["id"]) != row:
                    sys.exit(f"docs.jsonl line {row + 1}: id {doc['id']!r} is not the row index")
                words = word.findall(doc["text"].lower())
                tokens.append(np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, len(words)))
        rng = np.random.default_rng(0)
        word_hash = rng.integers(0, 2**64, len(vocab), dtype=np.uint64, endpoint=False)
        position_mult = rng.integers(0, 2**63, 5, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.shingles = [self._shingle(word_hash[t], position_mult) for t in tokens]
        self.sizes = np.array([len(s) for s in self.shingles], np.int64)
        self.n = len(self.shingles)
        truth = json.load(open(os.path.join(workdir, "truth.json")))
        self.planted = {rate: (np.array([p["id"] for p in truth["planted"] if p["edit_rate"] == rate], np.int64),
                               np.array([p["of"] for p in truth["planted"] if p["edit_rate"] == rate], np.int64))
                        for rate in EDIT_RATES}
        self.family = np.arange(self.n)
        for p in truth["planted"]:
            self.family[p["id"]] = p["of"]
        self.load_s = time.perf_counter() - t

    @staticmethod
    def _shingle(hashes, position_mult):
        """Set of 5-word-window hashes (a weighted sum of per-word random 64-bit values, wrapping)."""
        width = min(5, len(hashes))
        if width == 0:
            return np.zeros(0, np.uint64)
        windows = len(hashes) - width + 1
        h = np.zeros(windows, np.uint64)
        for k in range(width):
            h += hashes[k:k + windows] * position_mult[k]
        return np.unique(h)

    def has_near_kept(self, removed, kept):
        """For each document index in `removed`: is there a document in `kept` with shingle Jaccard >= JACCARD?

        Exact, with prefix filtering: J(A, B) >= t implies |A & B| >= t|A|, so B shares at least one of the
        |A| - ceil(t|A|) + 1 shingles of A that are rarest among kept documents; only those postings are read, and
        the candidates they give are checked exactly, most promising first, until one passes."""
        docs = np.repeat(kept, self.sizes[kept])
        hashes = np.concatenate([self.shingles[d] for d in kept])
        order = np.argsort(hashes, kind="stable")
        hashes, docs = hashes[order], docs[order]
        near = np.zeros(len(removed), bool)
        for i, d in enumerate(removed):
            a = self.shingles[d]
            lo, hi = np.searchsorted(hashes, a, "left"), np.searchsorted(hashes, a, "right")
            lens = hi - lo
            need = int(np.ceil(JACCARD * len(a) - 1e-9))
            prefix = len(a) - need + 1
            probe = np.argpartition(lens, prefix - 1)[:prefix] if prefix < len(a) else np.arange(len(a))
            lo, lens = lo[probe], lens[probe]
            total = int(lens.sum())
            if total == 0:
                continue
            starts = np.repeat(lo - (np.cumsum(lens) - lens), lens)
            candidates, in_prefix = np.unique(docs[starts + np.arange(total)], return_counts=True)
            b_sizes = self.sizes[candidates]
            # |A & B| >= t(|A| + |B|) / (1 + t) for J >= t; the shingles outside the prefix add at most |A| - prefix
            possible = in_prefix + (len(a) - prefix) >= JACCARD * (len(a) + b_sizes) / (1 + JACCARD) - 1e-9
            for b in candidates[possible][np.argsort(-in_prefix[possible], kind="stable")]:
                shingles = self.shingles[b]
                inter = np.count_nonzero(shingles[np.searchsorted(shingles, a) % len(shingles)] == a)
                if inter >= JACCARD * (len(a) + len(shingles) - inter) - 1e-9:
                    near[i] = True
                    break
        return near

    def score(self, kept_ids, universe, precision_sample):
        """Kept count, recall per edit rate and both precisions for one set of kept document indices."""
        t = time.perf_counter()
        kept = np.zeros(self.n, bool)
        kept[list(kept_ids)] = True
        in_universe = np.zeros(self.n, bool)
        in_universe[list(universe)] = True
        recall = {}
        for rate, (copy, source) in self.planted.items():
            both_in = in_universe[copy] & in_universe[source]
            copy, source = copy[both_in], source[both_in]
            recall[str(rate)] = float(np.mean(~(kept[copy] & kept[source]))) if len(copy) else None
        removed = np.flatnonzero(in_universe & ~kept)
        precision_on = f"all {len(removed)} removed"
        if precision_sample and len(removed) > precision_sample:
            removed = np.array(sorted(random.Random(0).sample(list(removed), precision_sample)))
            precision_on = f"seeded sample of {precision_sample} removed"
        near = self.has_near_kept(removed, np.flatnonzero(kept))
        kept_per_family = np.bincount(self.family[kept], minlength=self.n)
        family_kept = kept_per_family[self.family[removed]] > 0
        return {
            "universe": int(in_universe.sum()),
            "kept": int(kept.sum()),
            "recall_by_edit_rate": recall,
            "precision": float(near.mean()) if len(removed) else None,
            "ground_truth_precision": float((near | family_kept).mean()) if len(removed) else None,
            "precision_on": precision_on,
            "score_s": time.perf_counter() - t,
        }


def score_run(workload, cache, rec, kept, universe, precision_sample):
    """Adds the scores of `kept` to rec; a kept set already scored is not scored again."""
    digest = hashlib.sha1(np.array(sorted(kept), np.int64).tobytes()).hexdigest()
    if digest not in cache:
        cache[digest] = workload.score(kept, universe, precision_sample)
    rec.update(cache[digest], kept_digest=digest)


def summarise(runs):
    good = [r for r in runs if r["ok"]]
    if not good:
        return {"ok_runs": 0}
    return {
        "ok_runs": len(good),
        "wall_s": median([r["wall_s"] for r in good]),
        "kept": median([r["kept"] for r in good]),
        "recall_by_edit_rate": {str(rate): median([r["recall_by_edit_rate"][str(rate)] for r in good])
                                for rate in EDIT_RATES},
        "precision": median([r["precision"] for r in good]),
        "ground_truth_precision": median([r["ground_truth_precision"] for r in good]),
    }


# ---------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--runs", type=int, default=3, help="runs of ours")
    ap.add_argument("--datatrove-runs", type=int, default=1)
    ap.add_argument("--workdir", default=os.path.join(REPO, ".bench", "text-dedup"))
    ap.add_argument("--ours-args", default="", help="extra flags appended to `pipelines curate`")
    ap.add_argument("--timeout", type=float, default=1800, help="per-run limit in seconds")
    ap.add_argument("--precision-sample", type=int, default=0,
                    help="score precision on this many removed documents (seeded); 0 = all")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()

    workdir = os.path.abspath(args.workdir)
    make_workload(workdir, args.n)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    extra = shlex.split(args.ours_args)
    dt_runs = 0 if args.skip_datatrove else args.datatrove_runs
    ours_runs = 0 if args.skip_ours else args.runs
    dt_py, dt_versions = ensure_datatrove_venv() if dt_runs else (None, None)
    ingest_s, key_to_id = ingest_ours(workdir, args.timeout) if ours_runs else (None, None)
    if ours_runs and key_to_id is None:
        ours_runs = 0

    print("scoring: shingling docs.jsonl ...", flush=True)
    workload = Workload(workdir)
    print(f"  {workload.n} documents in {workload.load_s:.1f}s")
    cache = {}
    runs = {"datatrove": [], "ours": []}
    for run in range(max(dt_runs, ours_runs)):
        if run < dt_runs:
            print(f"run {run + 1}/{dt_runs}: datatrove ...", flush=True)
            rec, kept = run_datatrove(dt_py, workdir, run, args.timeout)
            if kept is not None:
                score_run(workload, cache, rec, kept, range(workload.n), args.precision_sample)
            runs["datatrove"].append(rec)
            print(f"  wall {fmt(rec['wall_s'])}s, kept {rec.get('kept')}, scored in {fmt(rec.get('score_s'))}s, "
                  f"load average {rec['loadavg_1m'][0]:.1f} -> {rec['loadavg_1m'][1]:.1f}")
        if run < ours_runs:
            print(f"run {run + 1}/{ours_runs}: ours ...", flush=True)
            rec, kept = run_ours(workdir, run, extra, args.timeout, key_to_id)
            if kept is not None:
                score_run(workload, cache, rec, kept, key_to_id.values(), args.precision_sample)
            runs["ours"].append(rec)
            print(f"  wall {fmt(rec['wall_s'])}s, kept {rec.get('kept')}, scored in {fmt(rec.get('score_s'))}s, "
                  f"load average {rec['loadavg_1m'][0]:.1f} -> {rec['loadavg_1m'][1]:.1f}")

    med = {tool: summarise(rs) for tool, rs in runs.items()}
    wall_ratio = ratio(med["datatrove"].get("wall_s"), med["ours"].get("wall_s"))

    print(f"\n## Text near-duplicate removal: {workload.n} documents, {os.cpu_count()} CPUs\n")
    rates = " | ".join(f"caught @{rate:g}" for rate in EDIT_RATES)
    print(f"| tool | runs | median wall (s) | kept | {rates} | precision J>={JACCARD} | ground-truth precision |")
    print("|---|---:|---:|---:|" + "---:|" * len(EDIT_RATES) + "---:|---:|")
    for name, tool in (("datatrove 0.10.1 MinHash", "datatrove"), ("ours (pipelines curate)", "ours")):
        m = med[tool]
        if not m["ok_runs"]:
            if runs[tool]:
                print(f"| {name} | 0/{len(runs[tool])} | failed | | " + "| " * len(EDIT_RATES) + "| |")
            continue
        caught = " | ".join(fmt(m["recall_by_edit_rate"][str(rate)], 3) for rate in EDIT_RATES)
        print(f"| {name} | {m['ok_runs']}/{len(runs[tool])} | {fmt(m['wall_s'])} | {m['kept']:.0f} | {caught} | "
              f"{fmt(m['precision'], 3)} | {fmt(m['ground_truth_precision'], 3)} |")
    if wall_ratio:
        print(f"\ndatatrove wall / ours wall: {wall_ratio:.2f}x")
    if ingest_s is not None:
        print(f"ours ingest (`pipelines crawl text`, not in the wall above): {ingest_s:.1f}s")
    print(f"scoring: shingling {workload.load_s:.1f}s; per kept set: "
          + ", ".join(f"{s['score_s']:.1f}s ({s['precision_on']})" for s in cache.values()))

    results = {"n": workload.n, "cpus": os.cpu_count(), "ours_args": extra, "datatrove_versions": dt_versions,
               "ours_ingest_s": ingest_s, "shingling_s": workload.load_s, "runs": runs, "medians": med,
               "ratio_datatrove_wall_over_ours": wall_ratio}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nraw figures: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    main()
