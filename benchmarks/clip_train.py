"""CLIP training-loop overhead: `pipelines pretrain --kind clip` (Ray Train + DeepSpeed) vs a bare PyTorch loop, same
model, same batches, same machine.

    .venv/bin/python benchmarks/clip_train.py [--images 2000] [--image-size 64] [--micro-batch 64] [--steps 100]
                                              [--warmup 10] [--runs 3] [--cpus N] [--workdir .bench/clip]
                                              [--loader-workers 0,1,2] [--no-bare-in-ray-train]

What it does:
  1. Workload, made once (reused while WORKDIR/workload.marker matches): --images coloured shapes captioned by
     what they show ("a red circle"), drawn as in tests/train/test_clip.py and written with the crawler's shard
     writer into WORKDIR/shards, and a byte-level BPE trained on the captions in WORKDIR/tokenizer. Both loops get
     that tokenizer.
  2. Alternates the loops over --runs rounds (the order rotates each round):
     - bare: a subprocess (this file with --bare) with a plain loop: `build_clip` with the same config and seed;
       AdamW with the same parameter groups and hyper-parameters; the same LambdaLR schedule; the same
       micro-batches from an `ImageCaptionStream` over the same shards (JPEG decode, random crop, flip and
       tokenization in the loop, as ours does); the same `contrastive_loss`; clip_grad_norm_ to the same
       grad_clip; one `loss.item()` per step; torch threads = --cpus.
     - bare in Ray Train: the same plain loop as the function of a one-worker `TorchTrainer` on a local Ray
       started as ours starts it (--cpus CPUs for the worker): Ray's and Ray Train's share, without DeepSpeed,
       MLflow or checkpoints.
     - ours: `pipelines pretrain --kind clip --workers 1 --cpus-per-worker C --tokenizer ... --max-failures 0
       --no-register-model --quiet`, otherwise its defaults (metrics to MLflow every step, checkpoints, held-out
       recall and export at the end; batches made in its default number of loader processes), MLflow in
       WORKDIR/mlflow.db. With --loader-workers N,M,...: one "ours" loop per count (`--loader-workers N`; 0:
       decoded in the training thread as the bare loop does), all in the same rotation.
     The bare loops decode in their training thread, as a plain user loop over the stream would.
  3. Per run, over the steps after --warmup: step samples/s = median of the per-step samples/s (both loops time
     a step from fetching the micro-batch to `loss.item()`); span samples/s = the measured steps' samples / the
     time from the end of step --warmup to the end of the last step (everything between steps included: ours'
     MLflow batches and checkpoints). Medians over the rounds; overhead = 1 - loop / bare, of the medians and
     as the median of each round's own ratio (a round's runs are closest in time).
  4. This is a VM: each run's steal time (CPU time the hypervisor gave other guests, /proc/stat) is recorded.
Prints a markdown table and writes all figures to WORKDIR/results.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS_BIN = os.path.join(REPO, ".venv", "bin", "pipelines")
SEED = 1234  # EngineConfig's default seed


def make_workload(workdir: str, images: int) -> tuple[str, str]:
    """Shape shards and a caption tokenizer, once; returns (shards dir, tokenizer dir)."""
    sys.path.insert(0, REPO)
    from pipelines.train.tokenizer import train_tokenizer
    from tests.train.test_clip import CAPTIONS, write_shape_shards

    shards, tokenizer = os.path.join(workdir, "shards"), os.path.join(workdir, "tokenizer")
    marker, want = os.path.join(workdir, "workload.marker"), f"images={images}"
    if os.path.exists(marker) and open(marker).read().strip() == want:
        return shards, tokenizer
    import shutil

    shutil.rmtree(shards, ignore_errors=True)
    write_shape_shards(shards, count=images, per_shard=500, seed=1)
    train_tokenizer(CAPTIONS * 10, 300, tokenizer)
    with open(marker, "w") as f:
        f.write(want + "\n")
    return shards, tokenizer


def config_for(args: argparse.Namespace, shards: str, tokenizer: str) -> dict:
    return {"model": {"preset": "tiny", "image_size": args.image_size, "patch_size": 8, "max_text_len": 16},
            "tokenizer": {"tokenizer": tokenizer},
            "data": {"shards": shards},
            "engine": {"workers": 1, "cpus_per_worker": args.cpus, "micro_batch": args.micro_batch,
                       "max_steps": args.steps, "seed": SEED}}


def bare(args: argparse.Namespace) -> None:
    """The plain loop (in its own process); writes per-step seconds and end times to --out."""
    import torch

    from pipelines.train.clip import ClipPretrainConfig, ImageCaptionStream, contrastive_loss
    from pipelines.train.clip_model import build_clip
    from pipelines.train.data import open_shards
    from pipelines.train.pretrain import lr_lambda
    from pipelines.train.tokenizer import load_tokenizer

    torch.set_num_threads(args.cpus)
    config = ClipPretrainConfig.model_validate(json.loads(args.config))
    e, o, d = config.engine, config.optim, config.data
    tokenizer = load_tokenizer(config.tokenizer.tokenizer)
    model = build_clip(config.model, tokenizer, e.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps, o.min_lr_ratio))
    stream = ImageCaptionStream(open_shards(d.shards), tokenizer, image_size=config.model.image_size,
                                max_text_len=config.model.max_text_len, micro_batch=e.micro_batch, rank=0,
                                world_size=1, seed=e.seed, shuffle_buffer=d.shuffle_buffer,
                                heldout_percent=d.heldout_percent, augment=d.augment, crop_scale=d.crop_scale,
                                hflip=d.hflip)
    batches = iter(stream)
    model.train()
    step_s, ends, losses = [], [], []
    for _ in range(e.max_steps):
        started = time.perf_counter()
        pixels, input_ids, attention_mask = next(batches)
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
        loss = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - started)
        ends.append(time.time())
    with open(args.out, "w") as f:
        json.dump({"step_s": step_s, "ends": ends, "final_loss": losses[-1]}, f)


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks since boot, from /proc/stat: on a VM, steal is time the hypervisor gave to
    other guests, which slows whichever loop is running and is no overhead of ours."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[7], sum(values[:8])


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    return 100 * (after[0] - before[0]) / max(1, after[1] - before[1])


def figures(step_s: list[float], ends: list[float], samples: int, warmup: int) -> dict:
    measured = step_s[warmup:]
    return {"step_samples_per_s": statistics.median(samples / s for s in measured),
            "span_samples_per_s": samples * (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])}


def bare_in_ray_train(args: argparse.Namespace) -> None:
    """The same plain loop, run as the function of a one-worker Ray Train `TorchTrainer` (a local Ray started
    as ours starts it): what Ray and Ray Train cost before any DeepSpeed, metrics or checkpoints of ours."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.runtime import init_ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # as `pipelines pretrain` starts its local Ray
    init_ray()
    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.cpus})
    TorchTrainer(lambda: bare(args), scaling_config=scaling,
                 run_config=RunConfig(storage_path=os.path.join(args.workdir, "ray-train"))).fit()


def run_bare(args: argparse.Namespace, config: dict, i: int, in_ray_train: bool = False) -> dict:
    out = os.path.join(args.workdir, f"bare-{i}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.cpus))
    subprocess.run([sys.executable, __file__, "--bare-in-ray-train" if in_ray_train else "--bare", "--config",
                    json.dumps(config), "--out", out, "--cpus", str(args.cpus)], check=True, env=env, cwd=REPO)
    data = json.load(open(out))
    return {**figures(data["step_s"], data["ends"], args.micro_batch, args.warmup), "final_loss": data["final_loss"]}


def run_ours(args: argparse.Namespace, shards: str, tokenizer: str, i: int, loader_workers: int | None) -> dict:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{os.path.join(args.workdir, 'mlflow.db')}"
    storage, name = os.path.join(args.workdir, "runs"), f"ours-{time.strftime('%H%M%S')}-{i}"
    cmd = [OURS_BIN, "pretrain", "--kind", "clip", "--shards", shards, "--tokenizer", tokenizer, "--workers", "1",
           "--cpus-per-worker", str(args.cpus), "--image-size", str(args.image_size), "--patch-size", "8",
           "--max-text-len", "16", "--micro-batch", str(args.micro_batch), "--max-steps", str(args.steps),
           "--seed", str(SEED), "--max-failures", "0", "--no-register-model", "--quiet", "--storage", storage,
           "--run-name", name, *(["--loader-workers", str(loader_workers)] if loader_workers is not None else [])]
    subprocess.run(cmd, check=True, env=dict(os.environ, MLFLOW_TRACKING_URI=uri), cwd=REPO)
    run_id = json.load(open(os.path.join(storage, name, "run.json")))["mlflow_run_id"]
    client = MlflowClient(uri)
    history = sorted(client.get_metric_history(run_id, "step_s"), key=lambda m: m.step)
    final_loss = max(client.get_metric_history(run_id, "loss"), key=lambda m: m.step).value
    return {**figures([m.value for m in history], [m.timestamp / 1000 for m in history], args.micro_batch,
                      args.warmup), "final_loss": final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=os.path.join(REPO, ".bench", "clip"))
    parser.add_argument("--loader-workers", help="comma-separated loader process counts, one ours loop each "
                                                 "(default: one ours loop with its default)")
    parser.add_argument("--no-bare-in-ray-train", dest="bare_in_ray_train_loop", action="store_false",
                        help="leave out the bare loop in Ray Train")
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare-in-ray-train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare(args)
    if args.bare_in_ray_train:
        return bare_in_ray_train(args)

    os.makedirs(args.workdir, exist_ok=True)
    shards, tokenizer = make_workload(args.workdir, args.images)
    config = config_for(args, shards, tokenizer)
    ours = {"ours": None} if args.loader_workers is None else {
        f"ours, {n} loader process{'es' * (n != 1)}": n for n in map(int, args.loader_workers.split(","))}
    loops = ["bare", *(["bare in Ray Train"] * args.bare_in_ray_train_loop), *ours]
    results: dict[str, list[dict]] = {loop: [] for loop in loops}
    for attempt in range(args.runs):
        for loop in loops[attempt % len(loops):] + loops[:attempt % len(loops)]:
            load_before, ticks_before = os.getloadavg()[0], cpu_ticks()
            if loop in ours:
                figures_ = run_ours(args, shards, tokenizer, attempt, ours[loop])
            else:
                figures_ = run_bare(args, config, attempt, in_ray_train=loop != "bare")
            figures_["load_1min"] = [load_before, os.getloadavg()[0]]  # other work on the machine shows here
            figures_["steal_pct"] = steal_pct(ticks_before, cpu_ticks())  # and the hypervisor's other guests here
            results[loop].append(figures_)
            print(f"round {attempt + 1} {loop}: {figures_['step_samples_per_s']:.0f} samples/s per step, "
                  f"{figures_['span_samples_per_s']:.0f} over the span, final loss {figures_['final_loss']:.4f} "
                  f"(load {figures_['load_1min'][0]:.1f} -> {figures_['load_1min'][1]:.1f}, "
                  f"steal {figures_['steal_pct']:.1f}%)", flush=True)
    keys = ("step_samples_per_s", "span_samples_per_s", "final_loss", "steal_pct")
    medians = {loop: {k: statistics.median(r[k] for r in runs) for k in keys} for loop, runs in results.items()}
    print(f"\nCLIP tiny, {args.image_size}px, micro-batch {args.micro_batch}, {args.steps} steps (first "
          f"{args.warmup} not measured), {args.cpus} CPU threads, median of {args.runs} rounds\n")
    print("| loop | step samples/s | span samples/s | final loss | steal |\n|---|---:|---:|---:|---:|")
    for loop, m in medians.items():
        print(f"| {loop} | {m['step_samples_per_s']:.0f} | {m['span_samples_per_s']:.0f} | {m['final_loss']:.4f} "
              f"| {m['steal_pct']:.1f}% |")
    for loop in loops[1:]:
        for k in ("step_samples_per_s", "span_samples_per_s"):
            paired = statistics.median(o[k] / b[k] for o, b in zip(results[loop], results["bare"], strict=True))
            print(f"{loop} vs bare, overhead ({k.split('_')[0]}): {1 - medians[loop][k] / medians['bare'][k]:.1%} of "
                  f"the medians, {1 - paired:.1%} median of the rounds' own ratios")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": results, "medians": medians}, f, indent=2)


if __name__ == "__main__":
    main()
