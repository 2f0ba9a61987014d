"""Image dedupe benchmark: how many of the crawl workload's planted duplicates `pipelines curate` catches.

    .venv/bin/python benchmarks/dedup_images.py [--n 3000] [--runs 3] [--port 8089] [--workdir .bench/dedup-images]
                                                [--config configs/curate/images-default.yaml] [--ours-args "..."]

What it does:
  1. Builds the crawl workload with ../shared/workloads/make_images.py (N real-photo crops; 4% exact copies
     of earlier images at new URLs, 4% copies resized by 0.6-0.95 and re-encoded at JPEG quality 60-80;
     truth.json says which), serves it with nginx on 127.0.0.1:PORT and crawls it once with
     `pipelines crawl images` (256 px, keep_ratio), like benchmarks/crawl_images.py.
  2. Runs `pipelines curate --config CONFIG` R times into fresh folders, timing each.
  3. Scores the result against truth.json: a planted copy is caught unless both it and its source are kept;
     a false removal is a removed image whose kept image is not a planted relative of it (same source).
Prints a table and writes WORKDIR/results.json. Targets (issue 3): exact 100%, re-encoded >= 95%, false
removals <= 1% of the distinct images.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import time

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crawl_images import OURS_BIN, REPO, make_workload, start_nginx, timed  # noqa: E402


def image_index(url):
    match = re.search(r"/(?:img|page)(\d+)\.jpg$", url or "")
    return int(match.group(1)) if match else None


def crawl(workdir, timeout):
    out = os.path.join(workdir, "shards")
    if os.path.exists(os.path.join(out, "manifest.json")):
        print(f"crawl: reusing {out}")
        return out
    cmd = [OURS_BIN, "crawl", "images", "--input", os.path.join(workdir, "urls.tsv"), "--output", out,
           "--url-col", "url", "--caption-col", "caption", "--image-size", "256", "--resize-mode", "keep_ratio",
           "--shard-size", "1000", "--allow-private-network", "--quiet"]
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", "crawl.log"), timeout)
    if rc != 0:
        sys.exit(f"crawl failed (rc {rc}):\n{output[-3000:]}")
    print(f"crawl: {wall:.1f}s")
    return out


def score(shards, out, truth):
    """Recall of planted copies and false removals, from the curated output and the removal log."""
    inp = pd.concat([pd.read_parquet(p, columns=["key", "url", "status"])
                     for p in sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.endswith(".parquet"))])
    inp = inp[inp["status"] == "success"]
    index_of = dict(zip(inp["key"], inp["url"].map(image_index)))
    crawled = set(index_of.values())
    kept_keys = pd.concat([pd.read_parquet(os.path.join(out, f), columns=["key"])
                           for f in os.listdir(out) if re.fullmatch(r"\d{5}\.parquet", f)])["key"]
    kept = {index_of[k] for k in kept_keys}
    source = {}  # image -> the original it was copied from (itself for originals)
    for kind in ("exact_dup_of", "near_dup_of"):
        for copy, orig in truth[kind].items():
            source[int(copy)] = orig
    root = lambda i: source.get(i, i)  # noqa: E731 - copies are made of originals only

    result = {}
    for kind, label in (("exact_dup_of", "exact"), ("near_dup_of", "reencoded")):
        pairs = [(int(c), o) for c, o in truth[kind].items() if int(c) in crawled and o in crawled]
        caught = sum(not (c in kept and o in kept) for c, o in pairs)
        result[f"{label}_pairs"] = len(pairs)
        result[f"{label}_recall"] = caught / len(pairs) if pairs else None
    removed = pd.read_parquet(os.path.join(out, "removed.parquet"))
    dups = removed[removed["cluster_id"].notna()]
    false = 0
    for key, kept_key in zip(dups["key"], dups["kept_key"]):
        i = index_of[key]
        j = index_of.get(kept_key) if kept_key else None
        if j is None or root(i) != root(j):
            false += 1
    distinct = len({root(i) for i in crawled})
    result.update(removed_as_duplicates=len(dups), false_removals=false, distinct_images=distinct,
                  false_removal_rate=false / distinct if distinct else None, kept=len(kept),
                  removed_by_reason=removed["reason"].value_counts().to_dict())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--workdir", default=os.path.join(REPO, ".bench", "dedup-images"))
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "curate", "images-default.yaml"))
    parser.add_argument("--ours-args", default="")
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)

    base_url = f"http://127.0.0.1:{args.port}"
    make_workload(workdir, args.n, base_url)
    truth = json.load(open(os.path.join(workdir, "truth.json")))
    if not os.path.exists(os.path.join(workdir, "shards", "manifest.json")):
        stop = start_nginx(os.path.join(workdir, "www"), args.port)
        shards = crawl(workdir, args.timeout)
        stop()
    else:
        shards = crawl(workdir, args.timeout)

    runs = []
    for run in range(args.runs):
        out = os.path.join(workdir, f"out-{run}")
        cmd = [OURS_BIN, "curate", "--input", shards, "--output", out, "--config", args.config, "--quiet",
               *shlex.split(args.ours_args)]
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"curate-{run}.log"), args.timeout)
        if rc != 0:
            sys.exit(f"curate failed (rc {rc}):\n{output[-3000:]}")
        rec = {"run": run, "wall_s": round(wall, 2), **score(shards, out, truth)}
        runs.append(rec)
        print(f"run {run}: {rec['wall_s']}s exact {rec['exact_recall']:.3f} reencoded {rec['reencoded_recall']:.3f} "
              f"false {rec['false_removals']}/{rec['distinct_images']} ({time.perf_counter() - t:.0f}s)", flush=True)

    last = runs[-1]
    summary = {"config": os.path.relpath(args.config, REPO), "n": args.n,
               "median_wall_s": statistics.median(r["wall_s"] for r in runs), **{
                   k: last[k] for k in ("exact_pairs", "exact_recall", "reencoded_pairs", "reencoded_recall",
                                        "false_removals", "distinct_images", "false_removal_rate", "kept")}}
    json.dump({"runs": runs, "summary": summary}, open(os.path.join(workdir, "results.json"), "w"), indent=2)
    print()
    print("| images | exact caught | re-encoded caught | false removals | curate wall (median) |")
    print("|---|---|---|---|---|")
    print(f"| {args.n} | {summary['exact_recall']:.1%} of {summary['exact_pairs']} | "
          f"{summary['reencoded_recall']:.1%} of {summary['reencoded_pairs']} | "
          f"{summary['false_removals']} of {summary['distinct_images']} ({summary['false_removal_rate']:.2%}) | "
          f"{summary['median_wall_s']:.1f} s |")


if __name__ == "__main__":
    main()
