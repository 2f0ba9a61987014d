"""Side-by-side crawl benchmark: our image crawler vs img2dataset 1.47.0, same workload, same machine, one run.

    .venv/bin/python benchmarks/crawl_images.py [--n 3000] [--runs 3] [--port 8089] [--workdir .bench/crawl]
                                                [--ours-args "..."] [--timeout 900] [--skip-ceiling] [--contention]

What it does:
  1. Builds the workload with ../shared/workloads/make_images.py into WORKDIR (skipped when WORKDIR/urls.tsv
     already exists for the same N and base URL; see WORKDIR/workload.marker), adds an allow-all robots.txt.
  2. Serves WORKDIR/www with ../shared/workloads/serve_www.sh on 127.0.0.1:PORT (nginx; stopped at exit).
  3. Creates .bench/img2dataset-venv (python3.11, img2dataset==1.47.0 + ray) if it is missing.
  4. Alternates R runs of img2dataset and of `pipelines crawl images`, each into a fresh output folder, timing the
     whole process. Success counts come from img2dataset's *_stats.json and from our OUT/manifest.json.
  5. Measures the single-core decode+resize+encode ceiling (OpenCV full decode, OpenCV reduced decode, ours)
     over the first 500 decodable img*.jpg files, in a subprocess pinned to CPU 0, and ours on two threads
     (unpinned): the two-thread ceiling the full phase is compared with.
  Prints a markdown table and writes raw per-run figures and medians to WORKDIR/results.json.

--contention: every run of both tools runs beside one other CPU-bound process (a Python busy loop at niceness 0,
started just before the run and stopped just after it), as on a machine where another job runs; results go to
WORKDIR/results-contention.json, with the CPU share the busy loop got during each run.

"Full phase": the span during which as many shards run at once as the tool has workers (2 here), from each
tool's shard stats (start/end times); its rate counts each shard's rows in proportion to the part of the shard's
span inside the phase. It leaves out process start, the ramp-up and the tail where fewer shards run.

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


def full_phase(spans, slots=2):
    """(rows/s, seconds) over the time `slots` shards run at once; spans = [(start, end, rows)]."""
    edges = sorted({t for a, b, _ in spans for t in (a, b)})
    phase, rows = 0.0, 0.0
    for lo, hi in zip(edges, edges[1:]):
        running = [(a, b, n) for a, b, n in spans if a <= lo and b >= hi]
        if len(running) >= slots:
            phase += hi - lo
            rows += sum(n * (hi - lo) / (b - a) for a, b, n in running if b > a)
    return (rows / phase if phase > 0 else None), phase


def shard_spans(paths):
    spans = []
    for path in paths:
        try:
            s = json.load(open(path))
            spans.append((s["start_time"], s["end_time"], s["count"]))
        except (OSError, ValueError, KeyError):
            pass
    return spans


class BusyLoop:
    """One other CPU-bound process (niceness 0) for the length of a run; its CPU share is recorded."""

    def __init__(self, enabled):
        self.enabled, self.proc = enabled, None

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        self.share = cpu / (time.perf_counter() - self.started)
        self.proc.kill()
        self.proc.wait()

    def record(self, rec):
        rec["load_1min_after"] = os.getloadavg()[0]
        if self.proc is not None:
            rec["busy_loop_cpu_share"] = self.share
        return rec


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
        rec["full_phase_rate"], rec["full_phase_s"] = full_phase(
            shard_spans(sorted(glob.glob(os.path.join(out, "*_stats.json")))))
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
        rec["full_phase_rate"], rec["full_phase_s"] = full_phase(
            shard_spans(sorted(glob.glob(os.path.join(out, "*_stats.json")))))
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
        "full_phase_rate": median([r.get("full_phase_rate") for r in good]),
        "busy_loop_cpu_share": median([r.get("busy_loop_cpu_share") for r in good]),
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
    if "ours" in methods:  # the two-thread ceiling: ours on a pool of 2 threads, both cores
        from concurrent.futures import ThreadPoolExecutor
        os.sched_setaffinity(0, range(os.cpu_count()))
        with ThreadPoolExecutor(2) as pool:
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                list(pool.map(methods["ours"], blobs))
                rates.append(len(blobs) / (time.perf_counter() - t))
        result["passes"]["ours_2_threads"] = rates
        result["rates"]["ours_2_threads"] = statistics.median(rates)
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
    ap.add_argument("--contention", action="store_true",
                    help="run both tools beside one other CPU-bound process (a busy loop)")
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
    load_before = os.getloadavg()
    try:
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}: img2dataset ...", flush=True)
            with BusyLoop(args.contention) as busy:
                r = run_img2dataset(i2d_exe, workdir, run, args.timeout)
            runs["img2dataset"].append(busy.record(r))
            print(f"  wall {fmt(r['wall_s'])}s, success {r.get('success')}, reported {fmt(r.get('tool_rate'))}/s")
            print(f"run {run + 1}/{args.runs}: ours ...", flush=True)
            with BusyLoop(args.contention) as busy:
                r = run_ours(workdir, run, extra, args.timeout)
            runs["ours"].append(busy.record(r))
            print(f"  wall {fmt(r['wall_s'])}s, success {r.get('success')}, reported {fmt(r.get('tool_rate'))}/s")
    finally:
        stop_nginx()
    load_after = os.getloadavg()
    ceiling = None if args.skip_ceiling else measure_ceiling(workdir)

    med = {tool: summarise(rs) for tool, rs in runs.items()}
    i2d, ours = med["img2dataset"], med["ours"]
    ratios = {"wall_rate": ratio(ours.get("wall_rate"), i2d.get("wall_rate")),
              "tool_rate": ratio(ours.get("tool_rate"), i2d.get("tool_rate"))}

    ratios["full_phase_rate"] = ratio(ours.get("full_phase_rate"), i2d.get("full_phase_rate"))
    beside = " beside a busy loop (--contention)" if args.contention else ""
    print(f"\n## Crawl benchmark{beside}: {args.n} rows, {args.runs} run(s) each, {os.cpu_count()} CPUs, "
          f"load (1/5/15 min) {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after\n")
    print("| tool | median wall (s) | success / wall (img/s) | tool-reported rate (rows/s) | full-phase rate (rows/s) "
          "| successes |" + (" busy loop's CPU share |" if args.contention else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if args.contention else ""))
    for name, m in (("img2dataset 1.47.0", i2d), ("ours (pipelines crawl images)", ours)):
        succ = f"{m['success']:.0f} / {m['total']:.0f}" if m.get("ok_runs") else "failed"
        busy = f" {fmt(m.get('busy_loop_cpu_share'), 2)} |" if args.contention else ""
        print(f"| {name} | {fmt(m.get('wall_s'), 2)} | {fmt(m.get('wall_rate'))} | {fmt(m.get('tool_rate'))} "
              f"| {fmt(m.get('full_phase_rate'))} | {succ} |{busy}")
    print(f"| ours / img2dataset | | {fmt(ratios['wall_rate'], 2)}x | {fmt(ratios['tool_rate'], 2)}x "
          f"| {fmt(ratios['full_phase_rate'], 2)}x | |" + (" |" if args.contention else ""))
    print("\nimg2dataset's reported rate counts all rows (failures included); ours is from manifest stats.")
    print("Per run (wall s): " + "; ".join(
        f"{tool} {' '.join(fmt(r['wall_s'], 2) for r in rs)}" for tool, rs in runs.items()))

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
        if "ours_2_threads" in r:
            full = ours.get("full_phase_rate")
            share = ratio(full, r["ours_2_threads"])
            print(f"\nours on 2 threads (both cores): {r['ours_2_threads']:.0f} images/s; our crawl's full-phase rate "
                  f"{fmt(full)} rows/s = {fmt(share and 100 * share, 0)}% of it (goal: 75%).")
        for note in ceiling["notes"]:
            print(f"note: {note}")

    results = {"n": args.n, "runs_each": args.runs, "port": args.port, "ours_args": extra,
               "cpus": os.cpu_count(), "contention": args.contention, "load_before": load_before,
               "load_after": load_after, "runs": runs, "medians": med, "ratios_ours_over_img2dataset": ratios,
               "ceiling": ceiling}
    path = os.path.join(workdir, "results-contention.json" if args.contention else "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nraw figures: {path}")


if __name__ == "__main__":
    main()
