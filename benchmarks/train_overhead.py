"""Training-loop overhead: `pipelines pretrain` (Ray Train + DeepSpeed) vs a bare PyTorch loop, same model, same
batches, same machine, one run; plus 1 -> 2 worker scaling on CPU.

    .venv/bin/python benchmarks/train_overhead.py [--preset tiny] [--seq-len 256] [--micro-batch 8] [--steps 100]
                                                  [--warmup 10] [--runs 3] [--scaling-runs 1] [--cpus N]
                                                  [--zero-stages 0,2] [--device cpu|cuda] [--skip-scaling]
                                                  [--workdir .bench/train] [--ours-args "..."] [--keep-runs]

On a GPU machine: `--device cuda --preset 125m --seq-len 1024 --micro-batch 16` (and again with `--preset 350m`).

What it does:
  1. Workload, made once (reused while WORKDIR/workload.marker matches): ../shared/workloads/make_text.py with
     --docs documents (real text found on the machine), ingested with `pipelines crawl text` into WORKDIR/shards,
     and a byte-level BPE of --vocab-size tokens trained on the shards' training split as `pipelines pretrain`
     would, in WORKDIR/tokenizer-VOCAB. Both loops get that tokenizer: neither run spends time training one.
  2. Alternates the loops over --runs rounds (the order rotates each round):
     - bare: a subprocess with a plain loop: `build_model` with the same preset, vocab, seq_len and seed; AdamW
       with the same parameter groups and hyper-parameters; the same LambdaLR schedule; the same micro-batches
       from a `TokenStream` over the same shards (it tokenizes in the loop, as ours does); clip_grad_norm_ to the
       same grad_clip; one `loss.item()` per step; torch threads = --cpus (and OMP_NUM_THREADS, as Ray sets it
       for a worker). On CUDA the forward runs under torch.autocast(bf16) with fp32 weights (DeepSpeed's bf16
       keeps bf16 weights and fp32 master copies: the same matmul precision, other bookkeeping).
     - ours-zZ for each of --zero-stages: `pipelines pretrain --workers 1 --cpus-per-worker C --zero-stage Z
       --tokenizer ... --max-failures 0 --no-register-model --quiet`, otherwise its defaults (metrics to MLflow
       every step, a checkpoint every 50 steps, held-out eval and export at the end), MLflow in WORKDIR/mlflow.db.
     The first --scaling-runs rounds also run (CPU only) ours ZeRO-2 with 1 worker x 1 CPU and with 2 workers x
     1 CPU, and the bare loop with 1 thread.
  3. Reads each run's per-step figures: ours from its MLflow run (`step_s`, `tokens_per_s`, `mfu`, `loss`; the run
     id is in STORAGE/RUN/run.json), bare from the JSON file its subprocess writes, computed the same way.

Figures per run, over the steps after --warmup:
  - span tokens/s, the headline: the measured steps' tokens / time from the end of step --warmup to the end of the
    last step, by the steps' timestamps (ours: its MLflow metric timestamps). Everything between steps is in it,
    and every slow step: it is what a user's wall clock sees.
  - step tokens/s: median of the per-step tokens/s. Both loops time a step the same way, from fetching the
    micro-batch to `loss.item()`, so what ours does between steps (MLflow batches, checkpoints) is not in it, nor
    are the slow steps of a burst of other work on the machine.
  - wall: the whole process, split into start-up (launch to the start of step 1: imports, Ray, the Ray Train
    worker, DeepSpeed, model, first data), loop (step 1 to the last step) and after (ours: held-out eval, last
    checkpoint, Ray Train shutdown, export, exit).
  - bare only: the share of its step time spent fetching micro-batches, and the stream alone: the same number of
    batches from a fresh TokenStream after the loop (left out of bare's "after").
Medians over the rounds; ratio = ours / bare; overhead = 1 - ratio; also each round's own span ratio (ours and
bare run minutes apart, so on a shared machine the per-round ratios show how far load moved the figures). MFU as
each loop computes it (on known GPUs against the data sheet's bf16 peak; on a CPU there is none, GFLOP/s only).
Each run records the 1-minute load average before and after it: other work on the machine shows there.
Prints markdown tables, writes all figures to WORKDIR/results.json and logs to WORKDIR/logs/.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
OURS_BIN = os.path.join(REPO, ".venv", "bin", "pipelines")
SEED = 1234  # PretrainConfig's default seed, given to both loops explicitly


def tail(text, n=30):
    return "\n".join(text.rstrip().splitlines()[-n:])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


def pct(x):
    return "n/a" if x is None else f"{x:.1%}"


# ---------------------------------------------------------------------------------------------- workload


def make_workload(workdir, docs, vocab_size, env, timeout):
    """Documents -> shards (`pipelines crawl text`) -> tokenizer, once; returns (shards dir, tokenizer dir)."""
    shards = os.path.join(workdir, "shards")
    tokenizer = os.path.join(workdir, f"tokenizer-{vocab_size}")
    marker = os.path.join(workdir, "workload.marker")
    want = f"docs={docs} vocab={vocab_size}"
    if (os.path.exists(marker) and open(marker).read().strip() == want
            and os.path.exists(os.path.join(shards, "manifest.json"))
            and os.path.exists(os.path.join(tokenizer, "tokenizer.json"))):
        print(f"workload: reusing {shards} and {tokenizer} ({want})")
        return shards, tokenizer
    for stale in ("workload", "shards", tokenizer):
        shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    make_text = os.path.join(SHARED, "workloads", "make_text.py")
    if not os.path.exists(make_text):
        sys.exit(f"{make_text} not found: the workload generator lives in the shared folder beside the repository")
    t = time.perf_counter()
    print(f"workload: make_text.py {docs} documents ...", flush=True)
    subprocess.run([sys.executable, make_text, os.path.join(workdir, "workload"), str(docs)], check=True)
    print("workload: `pipelines crawl text` ...", flush=True)
    cmd = [OURS_BIN, "crawl", "text", "--input", os.path.join(workdir, "workload", "docs.jsonl"), "--output", shards,
           "--quiet"]
    rc, _, output = timed(cmd, os.path.join(workdir, "logs", "crawl-text.log"), timeout, env)
    if rc != 0:
        sys.exit(f"pipelines crawl text failed (rc {rc}):\n{tail(output)}")
    print(f"workload: training a {vocab_size}-token BPE ...", flush=True)
    code = ("import sys\n"
            "from pipelines.train.config import PretrainConfig\n"
            "from pipelines.train.data import iter_texts, open_shards\n"
            "from pipelines.train.tokenizer import train_tokenizer\n"
            "c = PretrainConfig()\n"
            "shards = open_shards(sys.argv[1])\n"
            "texts = (text for _, (_, text) in zip(range(c.tokenizer.tokenizer_samples),"
            " iter_texts(shards, c.data.heldout_percent, 'train')))\n"
            "train_tokenizer(texts, int(sys.argv[2]), sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", code, shards, str(vocab_size), tokenizer], check=True, env=env, cwd=REPO)
    with open(marker, "w") as f:
        f.write(want + "\n")
    print(f"workload: done in {time.perf_counter() - t:.1f}s")
    return shards, tokenizer


# ---------------------------------------------------------------------------------------------- timed runs


def timed(cmd, log_path, timeout, env):
    """Run cmd in its own process group, output to log_path; returns (rc, wall_s, output)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                 cwd=REPO)
        except OSError as e:
            return None, None, f"could not start {cmd[0]}: {e}"
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    return rc, time.perf_counter() - t, open(log_path, errors="replace").read()


def summarise_steps(steps, warmup, tokens_per_step, launched, finished):
    """Per-run figures from per-step records {step, seconds, ts (epoch s at the step's end), loss, mfu}."""
    steps = sorted(steps, key=lambda s: s["step"])
    measured = [s for s in steps if s["step"] > warmup]
    if not measured:
        return {"ok": False, "error": f"no steps after warm-up ({len(steps)} logged)"}
    start = next((s for s in steps if s["step"] == warmup), None)
    first, last = steps[0], steps[-1]
    rec = {
        "steps_logged": len(steps),
        "tokens_per_s": median([tokens_per_step / s["seconds"] for s in measured]),
        "step_s": median([s["seconds"] for s in measured]),
        "mfu": median([s.get("mfu") for s in measured]),
        "final_loss": last["loss"],
    }
    if start is not None and last["ts"] > start["ts"]:
        rec["span_tokens_per_s"] = tokens_per_step * (last["step"] - start["step"]) / (last["ts"] - start["ts"])
    loop_start = first["ts"] - first["seconds"]
    rec["startup_s"] = loop_start - launched
    rec["loop_s"] = last["ts"] - loop_start
    rec["after_s"] = finished - last["ts"]
    return rec


def run_bare(workdir, label, spec, env, timeout):
    """The bare loop in a subprocess (this file with --bare-child); returns the run's record."""
    spec_path = os.path.join(workdir, "logs", f"{label}.spec.json")
    out_path = os.path.join(workdir, "logs", f"{label}.steps.json")
    with open(spec_path, "w") as f:
        json.dump({**spec, "out": out_path}, f, indent=2)
    if os.path.exists(out_path):
        os.remove(out_path)
    child_env = dict(env, OMP_NUM_THREADS=str(spec["threads"]))  # what Ray gives a worker with that many CPUs
    launched = time.time()
    load_before = os.getloadavg()[0]
    rc, wall, output = timed([sys.executable, os.path.abspath(__file__), "--bare-child", spec_path],
                             os.path.join(workdir, "logs", f"{label}.log"), timeout, child_env)
    finished = time.time()
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]]}
    if rc == 0 and os.path.exists(out_path):
        result = json.load(open(out_path))
        rec.update(summarise_steps(result["steps"], spec["warmup"], result["tokens_per_step"], launched, finished))
        measured = [s for s in result["steps"] if s["step"] > spec["warmup"]]
        rec["data_share"] = sum(s["data_s"] for s in measured) / sum(s["seconds"] for s in measured)
        rec["stream_alone_s"] = result["stream_alone_s"]
        rec["stream_tokens_per_s"] = result["tokens_per_step"] * spec["steps"] / result["stream_alone_s"]
        rec["after_s"] -= result["stream_alone_s"]  # not part of the loop's cost
        rec.setdefault("ok", True)
    else:
        rec["ok"] = False
    if not rec["ok"]:
        print(f"  {label} FAILED (rc {rc}); output tail:\n{tail(output)}")
    return rec


def run_ours(workdir, label, spec, env, timeout, extra_args, keep_runs):
    """One `pipelines pretrain` process; per-step figures from its MLflow run; returns the run's record."""
    from mlflow.tracking import MlflowClient

    storage = os.path.join(workdir, "runs")
    run_name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [OURS_BIN, "pretrain", "--shards", spec["shards"], "--tokenizer", spec["tokenizer"],
           "--preset", spec["preset"], "--seq-len", str(spec["seq_len"]), "--micro-batch", str(spec["micro_batch"]),
           "--max-steps", str(spec["steps"]), "--seed", str(SEED), "--loader-workers", str(spec["loader_workers"]),
           "--workers", str(spec["workers"]), "--cpus-per-worker", str(spec["threads"]),
           "--zero-stage", str(spec["zero_stage"]), "--use-gpu" if spec["device"] == "cuda" else "--no-use-gpu",
           "--storage", storage, "--run-name", run_name, "--max-failures", "0", "--no-register-model",
           "--quiet"] + extra_args
    launched = time.time()
    load_before = os.getloadavg()[0]
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"{label}.log"), timeout, env)
    finished = time.time()
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]], "run_name": run_name}
    try:
        run_json = json.load(open(os.path.join(storage, run_name, "run.json")))
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run_id = run_json["mlflow_run_id"]
        by_step = {}
        for key in ("tokens_per_s", "step_s", "mfu", "loss"):
            for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
                by_step.setdefault(m.step, {"step": m.step})[key] = m.value
                if key == "step_s":
                    by_step[m.step]["ts"] = m.timestamp / 1000
        steps = [{**s, "seconds": s["step_s"]} for s in by_step.values() if "step_s" in s and "loss" in s]
        tokens_per_step = spec["workers"] * spec["micro_batch"] * spec["seq_len"]
        rec.update(summarise_steps(steps, spec["warmup"], tokens_per_step, launched, finished))
        rec["mlflow_run_id"] = run_id
        # the loop's own figure, as a cross-check of the one computed from step_s
        rec["logged_tokens_per_s"] = median([s["tokens_per_s"] for s in steps if s["step"] > spec["warmup"]])
    except (OSError, ValueError, KeyError) as e:
        rec.update(ok=False, error=f"could not read the run's metrics: {e!r}")
    if rc != 0:
        rec["ok"] = False
    rec.setdefault("ok", True)
    if not rec["ok"]:
        print(f"  {label} FAILED (rc {rc}); output tail:\n{tail(output)}")
    if not keep_runs:
        shutil.rmtree(os.path.join(storage, run_name), ignore_errors=True)
    return rec


# ---------------------------------------------------------------------------------------------- the bare loop


def bare_child(spec_path):
    """The plain PyTorch loop (run as a subprocess); writes per-step figures to spec["out"]."""
    spec = json.load(open(spec_path))
    sys.path.insert(0, REPO)
    import torch

    from pipelines.train.config import PretrainConfig
    from pipelines.train.data import TokenStream, make_loader, open_shards
    from pipelines.train.model import build_model, flops_per_token, model_config, peak_flops
    from pipelines.train.pretrain import lr_lambda
    from pipelines.train.tokenizer import load_tokenizer

    config = PretrainConfig.model_validate({
        "model": {"preset": spec["preset"]}, "data": {"shards": spec["shards"], "seq_len": spec["seq_len"],
                                                      "loader_workers": spec["loader_workers"]},
        "engine": {"micro_batch": spec["micro_batch"], "max_steps": spec["steps"], "seed": SEED}})
    e, o = config.engine, config.optim
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    bf16 = e.precision == "bf16" or (e.precision == "auto" and device.type == "cuda")

    tokenizer = load_tokenizer(spec["tokenizer"])
    mconfig = model_config(config.model, len(tokenizer), config.data.seq_len, tokenizer.bos_token_id,
                           tokenizer.eos_token_id)
    model = build_model(mconfig, e.seed, config.model.activation_checkpointing).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps, o.min_lr_ratio))
    stream = TokenStream(open_shards(config.data.shards), spec["tokenizer"], seq_len=config.data.seq_len,
                         micro_batch=e.micro_batch, rank=0, world_size=1, seed=e.seed,
                         shuffle_buffer=config.data.shuffle_buffer, heldout_percent=config.data.heldout_percent,
                         num_workers=config.data.loader_workers)
    tokens_per_step = e.micro_batch * config.data.seq_len
    flops_per_step = flops_per_token(mconfig, config.data.seq_len) * tokens_per_step
    peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    params = list(model.parameters())
    batches = iter(make_loader(stream))
    model.train()
    steps = []
    for step in range(1, e.max_steps + 1):
        started = time.perf_counter()
        batch = next(batches).to(device, non_blocking=True)
        data_s = time.perf_counter() - started
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        seconds = time.perf_counter() - started
        steps.append({"step": step, "seconds": seconds, "data_s": data_s, "ts": time.time(), "loss": loss_value,
                      "mfu": flops_per_step / seconds / peak if peak else None})
    # the stream alone, for the same number of batches from a fresh stream: what tokenizing in the loop can deliver
    alone = iter(make_loader(TokenStream(
        open_shards(config.data.shards), spec["tokenizer"], seq_len=config.data.seq_len, micro_batch=e.micro_batch,
        rank=0, world_size=1, seed=e.seed, shuffle_buffer=config.data.shuffle_buffer,
        heldout_percent=config.data.heldout_percent, num_workers=config.data.loader_workers)))
    started = time.perf_counter()
    for _ in range(e.max_steps):
        next(alone)
    stream_s = time.perf_counter() - started
    with open(spec["out"], "w") as f:
        json.dump({"tokens_per_step": tokens_per_step, "steps": steps, "stream_alone_s": stream_s}, f)


# ---------------------------------------------------------------------------------------------- main


def summarise(runs):
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"ok_runs": 0}
    keys = ("tokens_per_s", "span_tokens_per_s", "step_s", "mfu", "wall_s", "startup_s", "loop_s", "after_s",
            "final_loss", "data_share", "stream_tokens_per_s")
    return {"ok_runs": len(good), **{k: median([r.get(k) for r in good]) for k in keys}}


def overhead(ours, bare, key):
    r = ratio(ours.get(key), bare.get(key))
    return r, None if r is None else 1 - r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "125m", "350m", "1b"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures")
    ap.add_argument("--runs", type=int, default=3, help="rounds of the main comparison, alternating the loops")
    ap.add_argument("--scaling-runs", type=int, default=1, help="rounds (the first ones) that also run the scaling")
    ap.add_argument("--cpus", type=int, default=None,
                    help="torch threads of the bare loop = --cpus-per-worker of ours (default: all CPUs; 1 on cuda)")
    ap.add_argument("--zero-stages", default="0,2", help="ZeRO stages of ours to run, comma-separated")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--loader-workers", type=int, default=0, help="dataloader processes (both loops)")
    ap.add_argument("--skip-scaling", action="store_true", help="no 1 -> 2 worker runs (always skipped on cuda)")
    ap.add_argument("--docs", type=int, default=8000, help="documents of the workload (make_text.py N)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workdir", default=os.path.join(REPO, ".bench", "train"))
    ap.add_argument("--ours-args", default="",
                    help="extra flags for `pipelines pretrain`; only for options that leave the math alone "
                         "(e.g. --checkpoint-every, --log-every): the bare loop does not see them")
    ap.add_argument("--timeout", type=float, default=900, help="per-run limit in seconds")
    ap.add_argument("--keep-runs", action="store_true", help="keep ours' run folders (checkpoints, export)")
    ap.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_child:
        return bare_child(args.bare_child)
    if args.warmup >= args.steps:
        sys.exit(f"--warmup {args.warmup} must be below --steps {args.steps}")

    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    # a fresh local Ray per run (never a cluster in RAY_ADDRESS); Ray sets each worker's OMP_NUM_THREADS itself
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    env.update(PIPELINES_HOME=os.path.join(workdir, "home"), MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlflow.db",
               RAY_USAGE_STATS_ENABLED="0")
    cpus = args.cpus or (1 if args.device == "cuda" else os.cpu_count())
    shards, tokenizer = make_workload(workdir, args.docs, args.vocab_size, env, args.timeout)
    extra = shlex.split(args.ours_args)
    base = {"shards": shards, "tokenizer": tokenizer, "preset": args.preset, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "device": args.device,
            "loader_workers": args.loader_workers, "workers": 1, "threads": cpus}

    # label -> (kind, spec): the main comparison at --cpus threads, then the scaling at one thread per worker
    main_loops = {"bare": ("bare", base)}
    for z in [int(z) for z in args.zero_stages.split(",") if z.strip()]:
        main_loops[f"ours-z{z}"] = ("ours", {**base, "zero_stage": z})
    scaling_loops = {}
    if not args.skip_scaling and args.device == "cpu" and os.cpu_count() >= 2:
        if cpus != 1:  # else the main bare loop already is the one-thread one
            scaling_loops["bare-1t"] = ("bare", {**base, "threads": 1})
        scaling_loops["ours-z2-1x1"] = ("ours", {**base, "zero_stage": 2, "threads": 1})
        scaling_loops["ours-z2-2x1"] = ("ours", {**base, "zero_stage": 2, "threads": 1, "workers": 2})
    loops = {**main_loops, **scaling_loops}

    runs = {label: [] for label in loops}
    rounds = max(args.runs, args.scaling_runs if scaling_loops else 0)
    started = time.perf_counter()
    for rnd in range(rounds):
        labels = ([lb for lb in main_loops] if rnd < args.runs else []) + \
                 ([lb for lb in scaling_loops] if rnd < args.scaling_runs else [])
        labels = labels[rnd % len(labels):] + labels[:rnd % len(labels)]  # rotate the order each round
        for label in labels:
            kind, spec = loops[label]
            print(f"round {rnd + 1}/{rounds}: {label} ...", flush=True)
            if kind == "bare":
                r = run_bare(workdir, f"{label}-{rnd}", spec, env, args.timeout)
            else:
                r = run_ours(workdir, f"{label}-{rnd}", spec, env, args.timeout, extra, args.keep_runs)
            runs[label].append(r)
            print(f"  span {fmt(r.get('span_tokens_per_s'), 0)} tokens/s, step {fmt(r.get('tokens_per_s'), 0)}"
                  f" tokens/s, wall {fmt(r.get('wall_s'))}s (start-up {fmt(r.get('startup_s'))}s), "
                  f"load {fmt(r['loadavg_1m'][0], 2)} -> {fmt(r['loadavg_1m'][1], 2)}", flush=True)
    total_s = time.perf_counter() - started

    med = {label: summarise(rs) for label, rs in runs.items()}
    bare = med["bare"]
    loads = [x for rs in runs.values() for r in rs for x in r["loadavg_1m"]]

    def shape(label):
        spec = loops[label][1]
        return f"{spec['workers']} x {spec['threads']}"

    print(f"\n## Training loop overhead: {args.preset}, seq_len {args.seq_len} x micro-batch {args.micro_batch} "
          f"({args.micro_batch * args.seq_len} tokens/step/worker), {args.steps} steps (figures over steps "
          f"{args.warmup + 1}-{args.steps}), {args.runs} round(s), {os.cpu_count()} CPUs, {args.device}\n")
    print("| loop | workers x threads | span tokens/s | ours/bare | overhead | step tokens/s | ours/bare | overhead "
          "| MFU | wall (s) | start-up (s) | loop (s) | after (s) | final loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for label in main_loops:
        m = med[label]
        if not m.get("ok_runs"):
            print(f"| {label} | {shape(label)} | failed | | | | | | | | | | | |")
            continue
        cells = ["", "", "", ""]
        if label != "bare":
            r_step, o_step = overhead(m, bare, "tokens_per_s")
            r_span, o_span = overhead(m, bare, "span_tokens_per_s")
            ratios[label] = {"step": r_step, "overhead_step": o_step, "span": r_span, "overhead_span": o_span}
            cells = [fmt(r_span, 3), pct(o_span), fmt(r_step, 3), pct(o_step)]
        print(f"| {label} | {shape(label)} | {fmt(m['span_tokens_per_s'], 0)} | {cells[0]} | {cells[1]} "
              f"| {fmt(m['tokens_per_s'], 0)} | {cells[2]} | {cells[3]} | {pct(m['mfu'])} | {fmt(m['wall_s'])} "
              f"| {fmt(m['startup_s'])} | {fmt(m['loop_s'])} | {fmt(m['after_s'])} | {fmt(m['final_loss'], 4)} |")
    print("\nspan (the headline) = measured tokens / time from the end of the warm-up to the last step: what a wall "
          "clock sees, with everything between steps (ours: MLflow batches, checkpoints); step = median per-step "
          "tokens/s (batch fetch to loss.item()); start-up = launch to step 1; after = last step to exit (ours: "
          "held-out eval, last checkpoint, Ray Train shutdown, export). Target: span overhead <= 5%.")
    for label in ratios:
        rounds_ratio = [ratio(o.get("span_tokens_per_s"), b.get("span_tokens_per_s"))
                        for o, b in zip(runs[label], runs["bare"]) if o.get("ok") and b.get("ok")]
        ratios[label]["span_per_round"] = rounds_ratio
        print(f"{label} / bare, span, round by round: {', '.join(fmt(x, 3) for x in rounds_ratio)}")
    if bare.get("ok_runs"):
        print(f"bare: fetching micro-batches from the TokenStream took {pct(bare['data_share'])} of its step time; "
              f"the stream alone delivers {fmt(bare['stream_tokens_per_s'], 0)} tokens/s ({args.steps} batches).")

    scaling = None
    if scaling_loops:
        one, two = med["ours-z2-1x1"], med["ours-z2-2x1"]
        bare_one = med["bare-1t"] if "bare-1t" in med else bare
        print(f"\n## Scaling, ours ZeRO-2, 1 -> 2 workers x 1 thread (one Ray CPU each), "
              f"{args.scaling_runs} round(s)\n")
        print("| loop | workers x threads | step tokens/s | span tokens/s | vs ours 1 x 1 (step) "
              "| vs ours 1 x 1 (span) |")
        print("|---|---|---:|---:|---:|---:|")
        rows = [("bare-1t" if "bare-1t" in med else "bare", bare_one), ("ours-z2-1x1", one), ("ours-z2-2x1", two)]
        if "ours-z2" in med:
            rows.append(("ours-z2", med["ours-z2"]))
        for label, m in rows:
            if not m.get("ok_runs"):
                print(f"| {label} | {shape(label)} | failed | | | |")
                continue
            print(f"| {label} | {shape(label)} | {fmt(m['tokens_per_s'], 0)} | {fmt(m['span_tokens_per_s'], 0)} "
                  f"| {fmt(ratio(m['tokens_per_s'], one.get('tokens_per_s')), 2)}x "
                  f"| {fmt(ratio(m['span_tokens_per_s'], one.get('span_tokens_per_s')), 2)}x |")
        scaling = {"speedup_2x1_over_1x1": ratio(two.get("tokens_per_s"), one.get("tokens_per_s")),
                   "speedup_2x1_over_1x1_span": ratio(two.get("span_tokens_per_s"), one.get("span_tokens_per_s")),
                   "ours_1x1_over_bare_1t": ratio(one.get("tokens_per_s"), bare_one.get("tokens_per_s"))}
        print(f"\nIdeal for 2 x 1 vs 1 x 1: 2.00x (same micro-batch per worker, a core each; tokens/s count both "
              f"workers); measured {fmt(scaling['speedup_2x1_over_1x1'], 2)}x. On {os.cpu_count()} cores Ray's own "
              f"processes share the cores with the workers. Ours 1 x 1 / bare 1 thread: "
              f"{fmt(scaling['ours_1x1_over_bare_1t'], 3)}.")

    if loads:
        print(f"\n1-minute load average over the runs: {min(loads):.2f} - {max(loads):.2f} on {os.cpu_count()} CPUs "
              f"(above ~{cpus} means other work shared the machine); whole benchmark {total_s / 60:.1f} min.")
    results = {"args": vars(args), "cpus": os.cpu_count(), "threads": cpus, "seconds": total_s,
               "loops": {k: v[1] for k, v in loops.items()}, "runs": runs, "medians": med,
               "ratios_ours_over_bare": ratios, "scaling": scaling}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"raw figures: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    main()
