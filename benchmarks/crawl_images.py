"""Side-by-side crawl benchmark: our image crawler vs img2dataset 1.47.0, same workload, same machine, one run.

    .venv/bin/python benchmarks/crawl_images.py [--n 3000] [--runs 3] [--port 8089] [--workdir .bench/crawl]
                                                [--ours-args "..."] [--timeout 900] [--skip-ceiling]

What it does:
  1. Builds the workload with ../shared/workloads/make_images.py into WORKDIR (skipped when WORKDIR/urls.tsv
     already exists for the same N and base URL; see WORKDIR/workload.marker), adds an allow-all robots.txt.
  2. Serves WORKDIR/www with ../shared/workloads/serve_www.sh on 127.0.0.1:PORT (nginx; stopped at exit).
  3. Creates .bench/img2dataset-venv (python3.11, img2dataset==1.47.0 + ray) if it is missing.
  4. Alternates R runs of img2dataset and of `pipelines crawl images`, each into a fresh output folder, timing the
     whole process. Success counts come from img2dataset's *_stats.json and from our OUT/manifest.json.
  5. Measures the single-core decode+resize+encode ceiling (OpenCV full decode, OpenCV reduced decode, ours)
     over the first 500 decodable img*.jpg files, in a subprocess pinned to CPU 0.
  Prints a markdown table and writes raw per-run figures and medians to WORKDIR/results.json.

Rates: "wall rate" = successes / whole-process wall time (start-up included) for both tools.
"tool rate" = what each tool reports: img2dataset's final "total ... images per sec" line (which counts ALL rows,
failures included, over the span of its shard stats), and our manifest's stats.rows_per_s (all rows, like
img2dataset's, over the crawl time without process/Ray start-up). results.json also holds img2dataset's successes / shard-stats span for comparison.
"""
import argparse
import atexit
import glob
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
I2D_VENV = os.path.join(REPO, ".bench", "img2dataset-venv")
OURS_BIN = os.path.join(REPO, ".venv", "bin", "pipelines")


def tail(text, n=30):
    return "\n".join(text.rstrip().splitlines()[-n:])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------- workload + server


def make_workload(workdir, n, base_url):
    marker = os.path.join(workdir, "workload.marker")
    want = f"{n} {base_url}"
    if os.path.exists(os.path.join(workdir, "urls.tsv")) and os.path.exists(marker):
        if open(marker).read().strip() == want:
            print(f"workload: reusing {workdir} ({want})")
            return
    print(f"workload: generating {n} rows into {workdir} ...", flush=True)
    shutil.rmtree(os.path.join(workdir, "www"), ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(SHARED, "workloads", "make_images.py"), workdir, str(n), base_url],
                   check=True)
    print(f"workload: done in {time.perf_counter() - t:.1f}s")
    with open(marker, "w") as f:
        f.write(want + "\n")


def start_nginx(www, port):
    with open(os.path.join(www, "robots.txt"), "w") as f:
        f.write("User-agent: *\nAllow: /\n")
    proc = subprocess.run(["bash", os.path.join(SHARED, "workloads", "serve_www.sh"), www, str(port)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"serve_www.sh failed (rc {proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")
    pid = int(proc.stdout.strip().splitlines()[-1])

    stopped = []

    def stop():
        if stopped:
            return
        stopped.append(pid)
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"nginx: stopped (pid {pid})")
        except ProcessLookupError:
            pass

    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/robots.txt"
    for _ in range(50):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if b"Allow" in r.read():
                    print(f"nginx: serving {www} on port {port} (pid {pid})")
                    return stop
        except OSError:
            time.sleep(0.1)
    stop()
    sys.exit(f"nginx did not answer on {url}")


def ensure_img2dataset_venv():
    exe = os.path.join(I2D_VENV, "bin", "img2dataset")
    py = os.path.join(I2D_VENV, "bin", "python")
    if os.path.exists(exe) and subprocess.run([py, "-c", "import img2dataset, ray"],
                                              capture_output=True).returncode == 0:
        return exe
    print(f"img2dataset: creating {I2D_VENV} ...", flush=True)
    subprocess.run(["python3.11", "-m", "venv", I2D_VENV], check=True)
    proc = subprocess.run([os.path.join(I2D_VENV, "bin", "pip"), "install", "-q", "img2dataset==1.47.0", "ray"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"img2dataset: pip install failed:\n{tail(proc.stdout + proc.stderr)}")
    return exe


# ---------------------------------------------------------------------------------------------- one timed run


def timed(cmd, log_path, timeout):
    """Run cmd in its own process group, output to log_path; returns (rc, wall_s, output)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def run_img2dataset(exe, workdir, run, timeout):
    out = os.path.join(workdir, "out-img2dataset")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "--url_list", os.path.join(workdir, "urls.tsv"), "--input_format", "tsv", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", out,
           "--processes_count", "2", "--thread_count", "64", "--image_size", "256", "--resize_mode", "keep_ratio",
           "--number_sample_per_shard", "1000", "--enable_wandb", "False"]
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"img2dataset-{run}.log"), timeout)
    rec = {"rc": rc, "wall_s": wall}
    stats = []
    for path in sorted(glob.glob(os.path.join(out, "*_stats.json"))):
        try:
            stats.append(json.load(open(path)))
        except (OSError, ValueError):
            pass
    if stats:
        rec["success"] = sum(s["successes"] for s in stats)
        rec["total"] = sum(s["count"] for s in stats)
        span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
        rec["stats_span_s"] = span
        rec["success_per_stats_span"] = rec["success"] / span if span > 0 else None
    reported = re.findall(r"^total\s*-.*images per sec: ([0-9.]+)", output, re.M)
    if reported:
        rec["tool_rate"] = float(reported[-1])
        rec["tool_rate_source"] = "printed 'total ... images per sec' (all rows / shard-stats span)"
    elif rec.get("success_per_stats_span"):
        rec["tool_rate"] = rec["success_per_stats_span"]
        rec["tool_rate_source"] = "*_stats.json successes / shard-stats span"
    ok = rc == 0 and "success" in rec
    rec["ok"] = ok
    if not ok:
        print(f"  img2dataset run {run} FAILED (rc {rc}); output tail:\n{tail(output)}")
    return rec


def run_ours(workdir, run, extra_args, timeout):
    out = os.path.join(workdir, "out-ours")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [OURS_BIN, "crawl", "images", "--input", os.path.join(workdir, "urls.tsv"), "--output", out,
           "--url-col", "url", "--caption-col", "caption", "--image-size", "256", "--resize-mode", "keep_ratio",
           "--shard-size", "1000", "--allow-private-network", "--quiet"] + extra_args
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"ours-{run}.log"), timeout)
    rec = {"rc": rc, "wall_s": wall}
    try:
        stats = json.load(open(os.path.join(out, "manifest.json")))["stats"]
        rec.update(success=stats["success"], total=stats["total"], elapsed_s=stats["elapsed_s"],
                   tool_rate=stats["rows_per_s"], tool_rate_source="manifest.json stats.rows_per_s",
                   samples_per_s=stats["samples_per_s"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        output += f"\n[benchmark] could not read {out}/manifest.json stats: {e!r}"
    ok = rc == 0 and "success" in rec
    rec["ok"] = ok
    if not ok:
        print(f"  ours run {run} FAILED (rc {rc}); output tail:\n{tail(output)}")
    return rec


def summarise(runs):
    good = [r for r in runs if r["ok"]]
    if not good:
        return {"ok_runs": 0}
    for r in good:
        r["wall_rate"] = r["success"] / r["wall_s"]
    return {
        "ok_runs": len(good),
        "wall_s": median([r["wall_s"] for r in good]),
        "wall_rate": median([r["wall_rate"] for r in good]),
        "tool_rate": median([r.get("tool_rate") for r in good]),
        "success": median([r["success"] for r in good]),
        "total": median([r["total"] for r in good]),
    }


# ---------------------------------------------------------------------------------------------- single-core ceiling


def ceiling_child(www, limit):
    """Runs in a subprocess pinned to CPU 0: decode+resize+encode images/s for each method."""
    os.sched_setaffinity(0, {0})
    import io

    import cv2
    import numpy as np
    from PIL import Image
    cv2.setNumThreads(1)
    truth_path = os.path.join(os.path.dirname(www), "truth.json")
    truncated = set(json.load(open(truth_path))["truncated"]) if os.path.exists(truth_path) else set()
    blobs = []
    for path in sorted(glob.glob(os.path.join(www, "img*.jpg"))):
        if int(re.findall(r"\d+", os.path.basename(path))[0]) in truncated:
            continue
        data = open(path, "rb").read()
        if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None:
            blobs.append(data)
        if len(blobs) == limit:
            break

    def cv2_pipeline(flag):
        def f(data):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            h, w = img.shape[:2]
            s = 256 / min(h, w)
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
        return f

    full, reduced = cv2_pipeline(cv2.IMREAD_COLOR), cv2_pipeline(cv2.IMREAD_REDUCED_COLOR_2)

    def reduced_if_big(data):
        # reduced decode only where the half-size image still has its short side >= 256 (no upscaling)
        w, h = Image.open(io.BytesIO(data)).size  # header only
        return reduced(data) if min(w, h) >= 512 else full(data)

    methods = {"opencv_full": full, "opencv_reduced2": reduced, "opencv_reduced2_if_big": reduced_if_big}
    notes = []
    try:
        sys.path.insert(0, REPO)
        from pipelines.ingest.imageproc import ImageConfig, ImageProcessor
        proc = ImageProcessor(ImageConfig(image_size=256, resize_mode="keep_ratio"))
        methods["ours"] = proc.process
    except Exception as e:  # the module may not exist yet
        notes.append(f"ours skipped: cannot import pipelines.ingest.imageproc ({e!r})")

    result = {"files": len(blobs), "notes": notes, "rates": {}, "passes": {}}
    for name, fn in methods.items():
        try:
            for data in blobs[:20]:  # warm-up
                fn(data)
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                for data in blobs:
                    fn(data)
                rates.append(len(blobs) / (time.perf_counter() - t))
            result["passes"][name] = rates
            result["rates"][name] = statistics.median(rates)
        except Exception as e:
            notes.append(f"{name} failed: {e!r}")
    print(json.dumps(result))


def measure_ceiling(workdir, limit=500):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--ceiling-child",
                           os.path.join(workdir, "www"), "--ceiling-limit", str(limit)],
                          capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", OPENCV_FOR_THREADS_NUM="1"))
    if proc.returncode != 0:
        print(f"ceiling: FAILED (rc {proc.returncode}):\n{tail(proc.stdout + proc.stderr)}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--workdir", default=os.path.join(REPO, ".bench", "crawl"))
    ap.add_argument("--ours-args", default="", help="extra flags appended to `pipelines crawl images`")
    ap.add_argument("--timeout", type=float, default=900, help="per-run limit in seconds (img2dataset may hang)")
    ap.add_argument("--skip-ceiling", action="store_true")
    ap.add_argument("--ceiling-child", help=argparse.SUPPRESS)
    ap.add_argument("--ceiling-limit", type=int, default=500, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ceiling_child:
        return ceiling_child(args.ceiling_child, args.ceiling_limit)

    # SIGTERM/SIGHUP -> normal exit so atexit stops nginx
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(1))

    workdir = os.path.abspath(args.workdir)
    base_url = f"http://127.0.0.1:{args.port}"
    make_workload(workdir, args.n, base_url)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    i2d_exe = ensure_img2dataset_venv()
    stop_nginx = start_nginx(os.path.join(workdir, "www"), args.port)
    extra = shlex.split(args.ours_args)

    runs = {"img2dataset": [], "ours": []}
    try:
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}: img2dataset ...", flush=True)
            r = run_img2dataset(i2d_exe, workdir, run, args.timeout)
            runs["img2dataset"].append(r)
            print(f"  wall {fmt(r['wall_s'])}s, success {r.get('success')}, reported {fmt(r.get('tool_rate'))}/s")
            print(f"run {run + 1}/{args.runs}: ours ...", flush=True)
            r = run_ours(workdir, run, extra, args.timeout)
            runs["ours"].append(r)
            print(f"  wall {fmt(r['wall_s'])}s, success {r.get('success')}, reported {fmt(r.get('tool_rate'))}/s")
    finally:
        stop_nginx()
    ceiling = None if args.skip_ceiling else measure_ceiling(workdir)

    med = {tool: summarise(rs) for tool, rs in runs.items()}
    i2d, ours = med["img2dataset"], med["ours"]
    ratios = {"wall_rate": ratio(ours.get("wall_rate"), i2d.get("wall_rate")),
              "tool_rate": ratio(ours.get("tool_rate"), i2d.get("tool_rate"))}

    print(f"\n## Crawl benchmark: {args.n} rows, {args.runs} run(s) each, {os.cpu_count()} CPUs\n")
    print("| tool | median wall (s) | success / wall (img/s) | tool-reported rate (img/s) | successes |")
    print("|---|---:|---:|---:|---:|")
    for name, m in (("img2dataset 1.47.0", i2d), ("ours (pipelines crawl images)", ours)):
        succ = f"{m['success']:.0f} / {m['total']:.0f}" if m.get("ok_runs") else "failed"
        print(f"| {name} | {fmt(m.get('wall_s'), 2)} | {fmt(m.get('wall_rate'))} | {fmt(m.get('tool_rate'))} | {succ} |")
    print(f"| ours / img2dataset | | {fmt(ratios['wall_rate'], 2)}x | {fmt(ratios['tool_rate'], 2)}x | |")
    print("\nimg2dataset's reported rate counts all rows (failures included); ours is from manifest stats.")

    if ceiling:
        r = ceiling["rates"]
        print(f"\n## Single-core decode+resize(256)+encode ceiling, {ceiling['files']} JPEGs, CPU 0\n")
        print("| method | images/s | ours / method |")
        print("|---|---:|---:|")
        for name in ("opencv_full", "opencv_reduced2", "opencv_reduced2_if_big", "ours"):
            if name in r:
                rel = "" if name == "ours" else fmt(ratio(r.get("ours"), r[name]), 2)
                print(f"| {name} | {r[name]:.0f} | {rel} |")
        print("\nopencv_*: cv2.imdecode (full, or IMREAD_REDUCED_COLOR_2) + INTER_AREA resize to short side 256 +"
              " JPEG q95; opencv_reduced2 upscales images whose short side is < 512 after halving,"
              " opencv_reduced2_if_big uses the reduced decode only where the short side stays >= 256.")
        for note in ceiling["notes"]:
            print(f"note: {note}")

    results = {"n": args.n, "runs_each": args.runs, "port": args.port, "ours_args": extra,
               "cpus": os.cpu_count(), "runs": runs, "medians": med, "ratios_ours_over_img2dataset": ratios,
               "ceiling": ceiling}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nraw figures: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    main()
