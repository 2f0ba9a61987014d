"""LoRA vs full fine-tuning: tokens/s and peak memory of `pipelines finetune --method lora|full`, same base, same
data, same settings, same machine, one run.

    .venv/bin/python benchmarks/finetune_memory.py [--preset small] [--seq-len 256] [--micro-batch 4] [--steps 20]
                                                   [--warmup 5] [--runs 3] [--zero-stage 0[,2]] [--rank 8]
                                                   [--lora-dropout P] [--device cpu|cuda] [--cpus N]
                                                   [--vocab-size 4096] [--examples 400] [--env KEY=VALUE ...]
                                                   [--workdir .bench/finetune] [--finetune-args "..."]
                                                   [--timeout 900] [--keep-runs]

On a GPU machine: `--preset 350m --device cuda --micro-batch 8 --steps 50 --warmup 10 --zero-stage 0,2`.

What it does:
  1. Workload (made once, reused while WORKDIR/workload.json matches the settings):
     - a generated instruction jsonl (WORKDIR/examples.jsonl): a short prompt and a response of seeded random
       sentences over 5000 made-up words, long enough that every example fills --seq-len tokens after the chat
       template, so no step trains on padding and tokens/s counts real tokens (checked and reported);
     - a byte-level BPE of --vocab-size tokens trained on those texts (`train_tokenizer`);
     - an untrained base: `build_model` with the preset's shape (seed 0), saved with the tokenizer as a Hugging Face
       folder and registered as `bench-base-PRESET` in WORKDIR/mlflow.db. Speed and memory do not depend on the
       weights' values, so the base is not pretrained (its losses mean nothing here);
     - the jsonl converted to instruction shards once (`prepare_examples`), so no run pays for the conversion.
  2. Alternates R rounds (the first method rotates each round) of, for each ZeRO stage Z and method M:
     `pipelines finetune --base models:/bench-base-PRESET/V --data SHARDS --method M --zero-stage Z --workers 1
     --seq-len --micro-batch --max-steps --checkpoint-every STEPS --eval-batches 1 --max-failures 0
     --no-register-model --quiet`, plus `--no-use-gpu --cpus-per-worker C` (C: all CPUs unless --cpus) or
     `--use-gpu`, and --rank / --lora-dropout when given; everything else at finetune's defaults (AdamW, LoRA rank 8,
     alpha 16, dropout 0.05 on the base's attention projections, fp32 on CPU, bf16 on GPU). Each is a subprocess
     with MLFLOW_TRACKING_URI=sqlite:///WORKDIR/mlflow.db, run folders in WORKDIR/runs (deleted unless --keep-runs).
     --env KEY=VALUE sets a variable for those processes (the local Ray workers inherit it), e.g.
     MALLOC_MMAP_THRESHOLD_=131072 to see how much of the RSS is glibc keeping freed activations.
  3. Reads each run's MLflow metrics (run id from STORAGE/RUN/run.json): per-step `tokens_per_s`, `step_s`, `loss`;
     `peak_rss_mb` and `trainable_parameters` at the end.

Figures per run:
  - tokens/s: median of the logged per-step tokens/s over the steps after --warmup (a step is timed from fetching
    the micro-batch to the optimizer step; checkpoints and metric flushes between steps are not in it).
  - peak RSS: the training worker's `peak_rss_mb` (its ru_maxrss), i.e. the high-water mark of that one Ray Train
    worker process over its whole life: the Python/Ray/torch/DeepSpeed/peft baseline, the base loaded in fp32,
    the DeepSpeed engine, the held-out evaluations, the training steps (weights, gradients, AdamW moments,
    activations) and the checkpoint save. Not the driver, raylet or GCS.
  - RSS before step 1: the same worker's RSS sampled from outside (psutil, every 0.25 s) just before its first
    step started: everything above except training: libraries, base (wrapped in LoRA), DeepSpeed engine,
    optimizer (AdamW allocates its moments at the first step), first held-out evaluation done.
    "peak - before" is what training itself added. The sampled maximum is kept as a cross-check of ru_maxrss.
  - wall: the whole `pipelines finetune` process, split into start-up (launch to the start of step 1: imports,
    Ray, copying the registered base into the run, the worker, DeepSpeed, the first held-out evaluation), loop
    (step 1 to the last step) and after (final evaluation, checkpoint, export of the adapter or full model).
  - GPU (--device cuda): the worker's peak GPU memory as nvidia-smi reports it, sampled every second (CUDA context
    and the caching allocator's reserve included; per process when nvidia-smi's pids match this machine's, else
    the whole GPU's used memory minus what was used before the run). `pipelines finetune` does not log
    torch.cuda.max_memory_allocated, so that figure is not available.
Medians over the R rounds; ratios LoRA / full per ZeRO stage. The model size (parameters x 4 bytes, fp32) and the
expected AdamW training state of full fine-tuning (gradient + two moments: 12 bytes per trainable parameter) are
printed beside the table so the RSS figures can be judged. Each run records the 1-minute load average before and
after it: other work on the machine shows there. Prints a markdown table and writes everything to
WORKDIR/results.json; logs to WORKDIR/logs/.
"""
import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS_BIN = os.path.join(REPO, ".venv", "bin", "pipelines")
METHODS = ("lora", "full")
SAMPLE_EVERY_S = 0.25


def tail(text, n=30):
    return "\n".join(text.rstrip().splitlines()[-n:])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


def millions(n):
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


# ---------------------------------------------------------------------------------------------- workload


def make_examples(path, n, seq_len, seed=7):
    """n prompt/response rows whose responses run well past seq_len tokens (made-up words, seeded)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "un", "pi", "gra", "thi", "ost", "ly", "bel",
                 "quo", "nes", "tar", "fi", "mon", "ak", "ze", "ru", "po", "lin", "ver", "sh", "ta", "ge", "bo"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(7000)})[:5000]
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like, as words are in text

    def sentence():
        w = rng.choices(words, weights, k=rng.randint(5, 14))
        return " ".join(w).capitalize() + rng.choice([".", ".", ".", "?", "!"])

    rows = []
    for _ in range(n):
        topic = rng.choices(words, weights, k=2)
        response = []
        while sum(len(s.split()) for s in response) < 2 * seq_len:  # ~1.3 tokens a word: well past seq_len
            response.append(sentence())
        rows.append({"prompt": f"Write a passage about {topic[0]} and {topic[1]}.", "response": " ".join(response)})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def make_workload(workdir, preset, vocab_size, seq_len, n_examples):
    """Examples, tokenizer, untrained base (registered) and instruction shards, once; returns the workload dict."""
    from pipelines.train import registry
    from pipelines.train.config import ModelConfig
    from pipelines.train.model import build_model, count_parameters, model_config
    from pipelines.train.sft import encode_example, messages_of, prepare_examples
    from pipelines.train.tokenizer import train_tokenizer
    from transformers.utils import logging as transformers_logging

    marker = os.path.join(workdir, "workload.json")
    want = {"preset": preset, "vocab_size": vocab_size, "seq_len": seq_len, "examples": n_examples}
    if os.path.exists(marker):
        saved = json.load(open(marker))
        if saved["settings"] == want and os.path.exists(os.path.join(saved["shards"], "manifest.json")):
            try:
                registry.resolve_version(saved["base"])
                print(f"workload: reusing {saved['base']} and {saved['shards']} ({want})")
                return saved
            except Exception as e:  # the registry was deleted: build again
                print(f"workload: {saved['base']} is gone ({e}); building again")
    t = time.perf_counter()
    transformers_logging.disable_progress_bar()
    data = os.path.join(workdir, "examples.jsonl")
    print(f"workload: {n_examples} examples, a {vocab_size}-token BPE and an untrained {preset} base ...", flush=True)
    rows = make_examples(data, n_examples, seq_len)
    folder = os.path.join(workdir, f"base-{preset}")
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer = train_tokenizer([r["prompt"] + "\n" + r["response"] for r in rows], vocab_size, folder)

    # Every example must fill seq_len, so that tokens/s (which counts seq_len per row) counts no padding.
    lengths, trained = [], []
    for r in rows[:100]:
        messages = messages_of(r, data)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        full_len = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        lengths.append(full_len)
        trained.append(int((encode_example(tokenizer, messages, seq_len)[1] != -100).sum()))
    if min(lengths) < seq_len:
        sys.exit(f"workload: an example has only {min(lengths)} tokens, fewer than --seq-len {seq_len}")

    # Positions: at least seq_len; RoPE needs no more.
    config = model_config(ModelConfig(preset=preset), len(tokenizer), max(seq_len, 2048), tokenizer.bos_token_id,
                          tokenizer.eos_token_id)
    model = build_model(config, seed=0)
    counts = count_parameters(model)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    name = f"bench-base-{preset}"
    with registry.training_run("finetune-bench-base", name, {**want, "pretrained": False}) as run_id:
        # ln(vocab): the loss of a uniform guess, about what an untrained model scores
        registered = registry.register_model(folder, name, run_id=run_id, metric="heldout_loss",
                                             value=math.log(len(tokenizer)))
    shards = prepare_examples(data, os.path.join(workdir, "data"))
    workload = {"settings": want, "base": registered.uri, "base_dir": folder, "shards": shards.url,
                "vocab": len(tokenizer), "parameters": counts["parameters"],
                "model_shape": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                "num_attention_heads", "intermediate_size",
                                                                "tie_word_embeddings")},
                "example_tokens_min": min(lengths), "example_tokens_median": median(lengths),
                "trained_tokens_per_row_median": median(trained)}
    with open(marker, "w") as f:
        json.dump(workload, f, indent=2)
    print(f"workload: {registered.uri}, {millions(counts['parameters'])} parameters, vocab {len(tokenizer)}; "
          f"examples have {min(lengths)}+ tokens (cut to {seq_len}); done in {time.perf_counter() - t:.1f}s")
    return workload


# ---------------------------------------------------------------------------------------------- one timed run


class WorkerSampler(threading.Thread):
    """Samples the RSS of the Ray Train worker processes under `root` (and, on cuda, their GPU memory)."""

    def __init__(self, root, gpu):
        super().__init__(daemon=True)
        self.root, self.gpu = root, gpu
        self.rss = []  # (epoch s, pid, bytes)
        self.gpu_samples = []  # (epoch s, {pid: MiB} of all compute apps, whole-GPU used MiB)
        self.stop = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.root)
        except psutil.NoSuchProcess:
            return
        last_gpu = 0.0
        while not self.stop.wait(SAMPLE_EVERY_S):
            now = time.time()
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for p in children:
                try:
                    if "RayTrainWorker" in p.name() or "RayTrainWorker" in " ".join(p.cmdline()[:1]):
                        self.rss.append((now, p.pid, p.memory_info().rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            if self.gpu and now - last_gpu >= 1.0:
                last_gpu = now
                self.gpu_samples.append((now, *gpu_memory()))

    def finish(self):
        self.stop.set()
        self.join()


def gpu_memory():
    """({pid: used MiB} of nvidia-smi's compute apps, used MiB of GPU 0), or ({}, None) without nvidia-smi."""
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}, None
    per_pid = {}
    for line in apps.strip().splitlines():
        pid, mib = (x.strip() for x in line.split(",")[:2])
        if pid.isdigit() and mib.replace(".", "").isdigit():
            per_pid[int(pid)] = float(mib)
    return per_pid, float(used.strip()) if used.strip().replace(".", "").isdigit() else None


def timed(cmd, log_path, timeout, env, gpu):
    """Run cmd in its own process group with the worker sampler; returns (rc, wall_s, output, sampler)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                 cwd=REPO)
        except OSError as e:
            return None, None, f"could not start {cmd[0]}: {e}", None
        sampler = WorkerSampler(p.pid, gpu)
        sampler.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
        finally:
            sampler.finish()
    return rc, time.perf_counter() - t, open(log_path, errors="replace").read(), sampler


def memory_figures(sampler, step1_start, gpu_before):
    """Worker RSS just before step 1 and the sampled maximum (MiB); peak GPU memory (MiB) on cuda."""
    rec = {}
    if sampler is None or not sampler.rss:
        return rec
    pids = {pid for _, pid, _ in sampler.rss}
    rec["worker_pids"] = sorted(pids)
    rec["sampled_peak_rss_mb"] = max(b for _, _, b in sampler.rss) / 2**20
    before = [b for ts, _, b in sampler.rss if ts <= step1_start]
    rec["rss_before_step1_mb"] = before[-1] / 2**20 if before else None
    if sampler.gpu_samples:
        per_worker = [sum(mib for pid, mib in apps.items() if pid in pids) for _, apps, _ in sampler.gpu_samples]
        if any(per_worker):
            rec["gpu_peak_mb"], rec["gpu_peak_source"] = max(per_worker), "nvidia-smi, the worker's process"
        else:
            used = [u for _, _, u in sampler.gpu_samples if u is not None]
            if used and gpu_before is not None:
                rec["gpu_peak_mb"] = max(used) - gpu_before
                rec["gpu_peak_source"] = "nvidia-smi, whole GPU 0 used minus used before the run"
    return rec


def run_finetune(workdir, label, spec, workload, env, timeout, extra_args, keep_runs):
    """One `pipelines finetune` process; figures from its MLflow run and the sampler; returns the run's record."""
    from mlflow.tracking import MlflowClient

    storage = os.path.join(workdir, "runs")
    run_name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [OURS_BIN, "finetune", "--base", workload["base"], "--data", workload["shards"],
           "--method", spec["method"], "--rank", str(spec["rank"]), "--seq-len", str(spec["seq_len"]),
           "--micro-batch", str(spec["micro_batch"]), "--max-steps", str(spec["steps"]),
           "--checkpoint-every", str(spec["steps"]), "--eval-batches", "1", "--workers", "1",
           "--zero-stage", str(spec["zero_stage"]), "--max-failures", "0",
           "--storage", storage, "--run-name", run_name, "--no-register-model", "--quiet"]
    cmd += ["--use-gpu"] if spec["device"] == "cuda" else ["--no-use-gpu", "--cpus-per-worker", str(spec["cpus"])]
    if spec["lora_dropout"] is not None:
        cmd += ["--lora-dropout", str(spec["lora_dropout"])]
    cmd += extra_args
    gpu = spec["device"] == "cuda"
    gpu_before = gpu_memory()[1] if gpu else None
    launched = time.time()
    load_before = os.getloadavg()[0]
    rc, wall, output, sampler = timed(cmd, os.path.join(workdir, "logs", f"{label}.log"), timeout, env, gpu)
    finished = time.time()
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]], "run_name": run_name}
    try:
        run_id = json.load(open(os.path.join(storage, run_name, "run.json")))["mlflow_run_id"]
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        by_step = {}
        for key in ("tokens_per_s", "step_s", "loss"):
            for m in client.get_metric_history(run_id, key):
                by_step.setdefault(m.step, {"step": m.step})[key] = m.value
                if key == "step_s":
                    by_step[m.step]["ts"] = m.timestamp / 1000  # logged right after the step
        steps = sorted((s for s in by_step.values() if "step_s" in s and "tokens_per_s" in s),
                       key=lambda s: s["step"])
        final = client.get_run(run_id).data.metrics
        measured = [s for s in steps if s["step"] > spec["warmup"]]
        if not measured:
            raise ValueError(f"no steps after the warm-up ({len(steps)} logged)")
        step1_start = steps[0]["ts"] - steps[0]["step_s"]
        rec.update(mlflow_run_id=run_id, steps_logged=len(steps),
                   tokens_per_s=median([s["tokens_per_s"] for s in measured]),
                   step_s=median([s["step_s"] for s in measured]),
                   final_loss=steps[-1].get("loss"),
                   peak_rss_mb=final.get("peak_rss_mb"),
                   trainable_parameters=final.get("trainable_parameters"),
                   startup_s=step1_start - launched, loop_s=steps[-1]["ts"] - step1_start,
                   after_s=finished - steps[-1]["ts"])
        rec.update(memory_figures(sampler, step1_start, gpu_before))
        if rec["peak_rss_mb"] is not None and rec.get("rss_before_step1_mb") is not None:
            rec["training_rss_mb"] = rec["peak_rss_mb"] - rec["rss_before_step1_mb"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        rec.update(ok=False, error=f"could not read the run's metrics: {e!r}")
    if rc != 0 or rec.get("peak_rss_mb") is None:
        rec["ok"] = False
    rec.setdefault("ok", True)
    if not rec["ok"]:
        print(f"  {label} FAILED (rc {rc}){': ' + rec['error'] if 'error' in rec else ''}; output tail:\n"
              f"{tail(output)}")
    if not keep_runs:
        shutil.rmtree(os.path.join(storage, run_name), ignore_errors=True)
    return rec


# ---------------------------------------------------------------------------------------------- main


SUMMARY_KEYS = ("tokens_per_s", "step_s", "peak_rss_mb", "rss_before_step1_mb", "training_rss_mb",
                "sampled_peak_rss_mb", "gpu_peak_mb", "wall_s", "startup_s", "loop_s", "after_s",
                "trainable_parameters", "final_loss")


def summarise(runs):
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"ok_runs": 0}
    return {"ok_runs": len(good), **{k: median([r.get(k) for r in good]) for k in SUMMARY_KEYS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "125m", "350m", "1b"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    ap.add_argument("--runs", type=int, default=3, help="rounds; each runs both methods once, alternating")
    ap.add_argument("--zero-stage", default="0", help="DeepSpeed ZeRO stage(s), comma-separated: 0 or 0,2")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: finetune's, 0.05)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cpus", type=int, default=None, help="--cpus-per-worker on CPU (default: all CPUs)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--examples", type=int, default=400, help="generated instruction examples")
    ap.add_argument("--workdir", default=os.path.join(REPO, ".bench", "finetune"))
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the finetune processes and their Ray workers (repeatable)")
    ap.add_argument("--finetune-args", default="", help="extra flags for both methods' `pipelines finetune`")
    ap.add_argument("--timeout", type=float, default=900, help="per-run limit in seconds")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints, exports)")
    args = ap.parse_args()
    if args.warmup >= args.steps:
        sys.exit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    stages = [int(z) for z in args.zero_stage.split(",") if z.strip()]
    bad = [kv for kv in args.env if "=" not in kv[1:]]
    if bad:
        sys.exit(f"--env {bad[0]}: expected KEY=VALUE")
    extra_env = dict(kv.split("=", 1) for kv in args.env)

    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    env.update(PIPELINES_HOME=os.path.join(workdir, "home"), MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlflow.db",
               RAY_USAGE_STATS_ENABLED="0", **extra_env)
    os.environ.update(PIPELINES_HOME=env["PIPELINES_HOME"], MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
    sys.path.insert(0, REPO)
    workload = make_workload(workdir, args.preset, args.vocab_size, args.seq_len, args.examples)
    cpus = args.cpus or os.cpu_count()
    extra = shlex.split(args.finetune_args)
    base = {"seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
            "rank": args.rank, "lora_dropout": args.lora_dropout, "device": args.device, "cpus": cpus}

    labels = [(z, m) for z in stages for m in METHODS]
    runs = {f"{m}-z{z}": [] for z, m in labels}
    for rnd in range(args.runs):
        for z in stages:
            for method in METHODS[rnd % 2:] + METHODS[:rnd % 2]:  # lora first in even rounds, full in odd
                label = f"{method}-z{z}"
                print(f"round {rnd + 1}/{args.runs}: {label} ...", flush=True)
                r = run_finetune(workdir, f"{label}-{rnd}", {**base, "method": method, "zero_stage": z}, workload,
                                 env, args.timeout, extra, args.keep_runs)
                runs[label].append(r)
                print(f"  {fmt(r.get('tokens_per_s'), 0)} tokens/s, peak RSS {fmt(r.get('peak_rss_mb'), 0)} MiB "
                      f"(before step 1 {fmt(r.get('rss_before_step1_mb'), 0)}), wall {fmt(r.get('wall_s'))}s, "
                      f"load {fmt(r['loadavg_1m'][0], 2)}->{fmt(r['loadavg_1m'][1], 2)}", flush=True)

    med = {label: summarise(rs) for label, rs in runs.items()}
    n = workload["parameters"]
    model_mb = n * 4 / 2**20
    gpu = args.device == "cuda"
    print(f"\n## LoRA vs full fine-tuning: {args.preset} ({millions(n)} parameters, {model_mb:.0f} MiB in fp32, "
          f"untrained), seq_len {args.seq_len} x micro-batch {args.micro_batch}, {args.steps} steps (tokens/s over "
          f"steps {args.warmup + 1}-{args.steps}), {args.runs} round(s), {os.cpu_count()} CPUs, "
          f"{'cuda' if gpu else f'cpu, {cpus} threads'}\n")
    gpu_col = ("| peak GPU (MiB) ", "---:|") if gpu else ("", "")
    print(f"| method | ZeRO | trainable parameters | tokens/s | peak RSS (MiB) | RSS before step 1 (MiB) "
          f"| peak - before (MiB) {gpu_col[0]}| wall (s) | start-up (s) | loop (s) | after (s) |")
    print(f"|---|---:|---:|---:|---:|---:|---:|{gpu_col[1]}---:|---:|---:|---:|")
    ratios = {}
    for z in stages:
        lora, full = med[f"lora-z{z}"], med[f"full-z{z}"]
        for name, m in ((f"LoRA r={args.rank}", lora), ("full", full)):
            if not m.get("ok_runs"):
                print(f"| {name} | {z} | failed |")
                continue
            share = m["trainable_parameters"] / n if m.get("trainable_parameters") else None
            gpu_cell = f"| {fmt(m['gpu_peak_mb'], 0)} " if gpu else ""
            print(f"| {name} | {z} | {millions(m['trainable_parameters'])} ({fmt(share and 100 * share, 2)}%) "
                  f"| {fmt(m['tokens_per_s'], 0)} | {fmt(m['peak_rss_mb'], 0)} | {fmt(m['rss_before_step1_mb'], 0)} "
                  f"| {fmt(m['training_rss_mb'], 0)} {gpu_cell}| {fmt(m['wall_s'])} | {fmt(m['startup_s'])} "
                  f"| {fmt(m['loop_s'])} | {fmt(m['after_s'])} |")
        keys = ("trainable_parameters", "tokens_per_s", "peak_rss_mb", "rss_before_step1_mb", "training_rss_mb",
                "gpu_peak_mb", "wall_s", "loop_s")
        r = {k: ratio(lora.get(k), full.get(k)) for k in keys}
        r["peak_rss_saved_mb"] = (full["peak_rss_mb"] - lora["peak_rss_mb"]
                                  if lora.get("ok_runs") and full.get("ok_runs") else None)
        ratios[f"z{z}"] = r
        gpu_cell = f"| {fmt(r['gpu_peak_mb'], 2)}x " if gpu else ""
        print(f"| LoRA / full | {z} | {fmt(r['trainable_parameters'], 4)} | {fmt(r['tokens_per_s'], 2)}x "
              f"| {fmt(r['peak_rss_mb'], 2)}x | {fmt(r['rss_before_step1_mb'], 2)}x | {fmt(r['training_rss_mb'], 2)}x "
              f"{gpu_cell}| {fmt(r['wall_s'], 2)}x | | {fmt(r['loop_s'], 2)}x | |")
    adam_state_mb = 12 * n / 2**20
    print(f"\nModel: {millions(n)} parameters = {model_mb:.0f} MiB of fp32 weights. Full fine-tuning adds a gradient "
          f"and two AdamW moments per weight: 12 bytes x {millions(n)} = {adam_state_mb:.0f} MiB that LoRA does not "
          f"have (its trainable matrices are tiny); activations are about the same for both (LoRA still "
          f"back-propagates through every layer), and ZeRO-1/2 add DeepSpeed's own fp32 copies and gradient buffers.")
    for z in stages:
        saved = ratios[f"z{z}"]["peak_rss_saved_mb"]
        if saved is not None:
            print(f"ZeRO-{z}: LoRA's peak RSS is {abs(saved):.0f} MiB {'below' if saved >= 0 else 'above'} full's.")
    if extra_env:
        print(f"environment of the finetune processes: {' '.join(args.env)}")
    print("peak RSS = the Ray Train worker's ru_maxrss (`peak_rss_mb` in MLflow): the Python/Ray/torch/DeepSpeed "
          "baseline, the base in fp32, the engine, held-out evaluations, training and the checkpoint save; "
          f"RSS before step 1 = that worker's RSS sampled every {SAMPLE_EVERY_S} s just before step 1 (all of it but "
          "training); tokens/s = median logged per-step tokens/s; start-up = launch to step 1; after = last step "
          "to exit (final evaluation, checkpoint, export).")
    if gpu:
        print("peak GPU = nvidia-smi's peak used memory of the worker (CUDA context and allocator reserve included; "
              "see results.json gpu_peak_source). torch.cuda.max_memory_allocated is not logged by finetune.")

    results = {"args": vars(args), "cpus": os.cpu_count(), "threads": cpus, "workload": workload,
               "model_fp32_mb": model_mb, "full_adamw_state_mb": adam_state_mb, "runs": runs, "medians": med,
               "ratios_lora_over_full": ratios}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nraw figures: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    main()
