"""Diffusion training: `pipelines pretrain --kind diffusion` vs diffusers' examples/text_to_image/train_text_to_image.py
(the script people copy), same denoiser, same images, same batch and steps, same machine; plus our loop vs a bare
PyTorch loop over the same latents.

    .venv/bin/python benchmarks/train_diffusion.py [--images 1000] [--preset tiny] [--micro-batch 16] [--steps 100]
                                                   [--warmup 10] [--lr 5e-4] [--snr-gamma 5] [--runs 3] [--cpus N]
                                                   [--loops peer,ours-latents,ours-images,bare]
                                                   [--workdir .bench/train-diffusion] [--keep-runs]
    .venv/bin/python benchmarks/train_diffusion.py --vae small --profile 30 --runs 3   # per-step costs, one process

What it does:
  1. Workload, made once (reused while WORKDIR/workload/marker matches): --images captioned coloured shapes
     ("a red circle", 48 px JPEGs, drawn by tests/train/test_clip.py's `write_shape_shards`) as image shards;
     tests/tiny_autoencoder.py's autoencoder (f2, 4 latent channels, 32 px images -> 4x16x16 latents) trained
     on them with a tight posterior, like Stable Diffusion's (`train_autoencoder`);
     a tiny CLIP (`ClipModelConfig(preset="tiny")`, random weights: the benchmark needs its cost, not its
     quality) with a CLIP BPE tokenizer (transformers' `CLIPTokenizer` over the caption words), because the
     peer hard-codes `CLIPTokenizer` and both sides must turn a caption into the same ids; both registered in
     WORKDIR/mlflow.db; `pipelines encode` -> latent shards; the training split of the image shards (held-out
     keys left out, as ours leaves them out) as an imagefolder (`metadata.jsonl` with file_name, text) for the
     peer; and a StableDiffusionPipeline folder (unet, vae, text_encoder, tokenizer, scheduler) made by
     `make_pipeline` of those parts and `build_unet(preset, seed=--seed)`: the very weights `pipelines pretrain`
     and the bare loop initialise their UNet with, so all loops start from the same denoiser.
  2. Alternates --runs rounds of the loops (the order rotates each round), each a fresh process:
     - peer: train_text_to_image.py from ../shared/peers/diffusers, run by this file (--peer-child) with runpy,
       `torchvision` being benchmarks/train_diffusion_shims on that process's PYTHONPATH only, HF_*_OFFLINE=1,
       --mixed_precision no, --dataloader_num_workers 0, --center_crop --image_interpolation_mode bicubic (our
       view of an image: shorter side bicubic, centre crop, no flip), no EMA, --snr_gamma, constant LR with no
       warm-up, AdamW betas 0.9/0.999, eps 1e-8, weight decay 0, gradient norm clipped to 1; images encoded by
       the VAE every step (latent_dist.sample()), as the script does.
     - ours-latents: `pipelines pretrain --kind diffusion` on the latent shards, 1 worker x --cpus, the same
       preset, batch, steps, optimizer, schedule, clipping and loss; --caption-dropout 0 and --ema-decay 0 (the
       peer has neither here); checkpoint only at the end; the end-of-run evaluation cut to 2 samples x 1
       sampler step; no registration.
     - ours-images: the same on the image shards with --autoencoder: each batch encoded on the fly
       (latent_dist.sample()), like the peer.
     - bare: a plain loop in a subprocess (--bare-child): the latent shards' training split in memory, shuffled
       each epoch, the same UNet init, text encoder, noise schedule, noise and timesteps per step
       (`step_generator`), `diffusion_loss`, AdamW groups, clipping, one `loss.item()` per step.
  3. Each loop's steps are timed the same way: the wall-clock time at the end of each optimizer step (ours: the
     MLflow timestamps of its per-step `loss` metric; peer: its `accelerator.log({"train_loss"})` call, recorded
     by a wrapper around `Accelerator.log`; bare: after `loss.item()`).

Figures per run: span samples/s = batch x (last step - step --warmup) / (time between those steps' ends), so
everything a loop does between steps (data, logging, metric batches) is in it; whole-process wall, split into
start-up (launch to the end of step 1) and after (last step to exit: ours' evaluation, checkpoint, export;
the peer's pipeline save); the loss after N steps = mean of the last 10 steps' losses, and the loss curve
(mean per 10-step window). Medians over the rounds; ratios ours/peer and ours/bare (overhead = 1 - ours/bare).
The 1-minute load average is recorded before and after each run: this VM is shared and noisy, so compare
only rounds where it stayed near --cpus. Writes WORKDIR/results.json, logs to WORKDIR/logs/.
"""
import argparse
import io
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time

from train_overhead import fmt, median, pct, ratio, tail, timed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIMS = os.path.join(REPO, "benchmarks", "train_diffusion_shims")
PEER = os.path.join(os.path.dirname(REPO), "shared", "peers", "diffusers", "train_text_to_image.py")
OURS_BIN = os.path.join(REPO, ".venv", "bin", "pipelines")
CLIP_NAME, AE_NAME = "bench-clip", "bench-ae"
HELDOUT_PERCENT = 5.0  # DiffusionDataConfig's default: these keys are left out of the peer's imagefolder too
LOOPS = ("peer", "ours-latents", "ours-images", "bare")


# ---------------------------------------------------------------------------------------------- workload


def clip_tokenizer(words):
    """transformers' CLIPTokenizer (byte-level BPE, lower-case, <|startoftext|> ... <|endoftext|>) whose
    vocabulary is the caption words: each word merged letter by letter into one `word</w>` token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def make_workload(workdir, images, preset, seed, env, timeout, vae="tiny"):
    """Image shards, autoencoder, CLIP, latent shards, imagefolder and SD pipeline folder, once; returns their
    paths."""
    sys.path.insert(0, REPO)
    os.environ.update(env)  # the registrations below go to the benchmark's MLflow
    w = os.path.join(workdir, "workload")
    paths = {"images": f"{w}/image-shards", "latents": f"{w}/latent-shards", "imagefolder": f"{w}/imagefolder",
             "autoencoder": f"{w}/autoencoder", "clip": f"{w}/clip", "pipeline": f"{w}/sd-pipeline-{preset}-{seed}"}
    marker, want = f"{w}/marker", f"images={images} vae={vae}"
    if not (os.path.exists(marker) and open(marker).read().strip() == want):
        shutil.rmtree(w, ignore_errors=True)
        os.makedirs(w)
        shutil.rmtree(os.path.join(workdir, "home"), ignore_errors=True)  # the old registrations go with it
        if os.path.exists(os.path.join(workdir, "mlflow.db")):
            os.remove(os.path.join(workdir, "mlflow.db"))
        build_sources(paths, images, seed, env, timeout, workdir, vae)
        with open(marker, "w") as f:
            f.write(want + "\n")
    if not os.path.exists(os.path.join(paths["pipeline"], "model_index.json")):
        build_pipeline_folder(paths, preset, seed)
    return paths


def build_sources(paths, images, seed, env, timeout, workdir, vae):
    """Everything but the SD pipeline folder (which depends on the preset and seed)."""
    t = time.perf_counter()
    from pipelines.shards import read_tar
    from pipelines.train.clip_model import ClipBundle, ClipModelConfig, build_clip, image_processor
    from pipelines.train.data import is_heldout, open_shards
    from pipelines.train.registry import register_clip, register_folder, training_run
    from tests.train.test_clip import CAPTIONS, write_shape_shards

    print(f"workload: {images} captioned shapes as image shards ...", flush=True)
    write_shape_shards(paths["images"], count=images, per_shard=250, seed=1)
    print(f"workload: training the {vae} autoencoder ...", flush=True)
    posterior_spread = train_autoencoder(paths["autoencoder"], paths["images"], seed, vae)
    print(f"workload: autoencoder posterior std / latent spread = {posterior_spread:.3f}", flush=True)
    words = sorted({word for caption in CAPTIONS for word in caption.split()})
    config = ClipModelConfig(preset="tiny", image_size=32, patch_size=8, max_text_len=8)
    tokenizer = clip_tokenizer(words)
    ClipBundle(build_clip(config, tokenizer, seed), tokenizer, image_processor(config.image_size),
               config.max_text_len).save(paths["clip"])
    with training_run("bench-train-diffusion", None, {}) as run_id:
        pass
    register_clip(paths["clip"], CLIP_NAME, run_id=run_id, metric="recall_at_1", value=0.0)
    register_folder("autoencoder", paths["autoencoder"], AE_NAME, run_id=run_id, metric="heldout_psnr", value=0.0,
                    lower_is_better=False)
    print("workload: `pipelines encode` ...", flush=True)
    rc, _, output = timed([OURS_BIN, "encode", "--shards", paths["images"], "--output", paths["latents"],
                           "--autoencoder", f"models:/{AE_NAME}@champion", "--quiet"],
                          os.path.join(workdir, "logs", "encode.log"), timeout, env)
    if rc != 0:
        sys.exit(f"pipelines encode failed (rc {rc}):\n{tail(output)}")
    os.makedirs(paths["imagefolder"])
    kept = 0
    with open(os.path.join(paths["imagefolder"], "metadata.jsonl"), "w") as meta:
        for url in open_shards(paths["images"]).tars:
            for key, sample in read_tar(url, ("jpg", "txt")).items():
                if is_heldout(key, HELDOUT_PERCENT):
                    continue
                with open(os.path.join(paths["imagefolder"], f"{key}.jpg"), "wb") as f:
                    f.write(sample["jpg"])
                meta.write(json.dumps({"file_name": f"{key}.jpg", "text": sample["txt"].decode()}) + "\n")
                kept += 1
    print(f"workload: done in {time.perf_counter() - t:.1f}s ({kept} training images)")


def train_autoencoder(folder, image_shards, seed, vae="tiny", steps=200, batch=32):
    """tests/tiny_autoencoder.py's autoencoder (f2, 4 latent channels, 32 px; `vae="small"`: the `small` preset
    of `pipelines pretrain --kind autoencoder`, f4 with 2 layers per block and mid-block attention like Stable
    Diffusion's VAE, on 64 px images, 60 steps of 16), trained on the workload's images
    with the decoder fed posterior samples, its log-variance started at -8: a posterior as tight as Stable
    Diffusion's VAE's, so that the peer's (and ours-images') `latent_dist.sample()` and the precomputed
    posterior means are nearly the same latents. (A fresh posterior has std 1, which the 1e-6 KL weight never
    shrinks: its samples would be mostly noise and the loop on them would learn another task.) Saved with its
    scaling factor, 1 / the latents' std; returns the posterior std over that std."""
    import numpy as np
    import torch

    from pipelines.shards import read_tar
    from pipelines.train.autoencoder import image_pixels
    from pipelines.train.data import open_shards
    from tests.tiny_autoencoder import IMAGE_SIZE, tiny_vae

    if vae == "small":
        from pipelines.train.autoencoder import build_autoencoder
        from pipelines.train.autoencoder_config import AutoencoderModelConfig

        size, steps, batch = 64, 60, 16
        vae = build_autoencoder(AutoencoderModelConfig(preset="small", image_size=size), seed)
    else:
        size, vae = IMAGE_SIZE, tiny_vae(seed)
    jpgs = [s["jpg"] for url in open_shards(image_shards).tars for s in read_tar(url, ("jpg",)).values()]
    x = torch.from_numpy(np.stack([image_pixels(data, size) for data in jpgs]))
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch_x = x[torch.randperm(len(x), generator=generator)[:batch]]
        posterior = vae.encode(batch_x).latent_dist
        loss = (vae.decode(posterior.sample(generator=generator)).sample - batch_x).abs().mean() \
            + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        posterior = vae.encode(x[:256]).latent_dist
        spread = posterior.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / spread)
    vae.eval().save_pretrained(folder)
    return posterior.std.mean().item() / spread


def build_pipeline_folder(paths, preset, seed):
    """diffusers' StableDiffusionPipeline folder of the benchmark's parts, with `build_unet(preset, seed)`."""
    from diffusers import AutoencoderKL

    from pipelines.train.diffusion import (DiffusionModelConfig, ObjectiveConfig, build_unet, latent_shape,
                                           load_text_encoder, make_pipeline, quiet_progress)

    quiet_progress()
    text_encoder, tokenizer = load_text_encoder(paths["clip"])
    vae = AutoencoderKL.from_pretrained(paths["autoencoder"])
    channels, size = latent_shape(vae.config)
    unet = build_unet(DiffusionModelConfig(preset=preset), channels, size, text_encoder.config.hidden_size, seed)
    make_pipeline(unet, vae, text_encoder, tokenizer, ObjectiveConfig()).save_pretrained(paths["pipeline"])


# ---------------------------------------------------------------------------------------------- timed runs


def summarise_steps(steps, warmup, batch, launched, finished):
    """Per-run figures from per-step records {step, ts (epoch s at the step's end), loss}."""
    steps = sorted(steps, key=lambda s: s["step"])
    if len(steps) < 2 or steps[-1]["step"] <= warmup:
        return {"ok": False, "error": f"no steps after warm-up ({len(steps)} logged)"}
    start = next((s for s in steps if s["step"] == warmup), steps[0])
    last = steps[-1]
    losses = [s["loss"] for s in steps]
    return {
        "steps_logged": len(steps),
        "span_samples_per_s": batch * (last["step"] - start["step"]) / (last["ts"] - start["ts"]),
        "loss_last10": statistics.fmean(losses[-10:]),
        "loss_windows": [statistics.fmean(losses[i:i + 10]) for i in range(0, len(losses) - 9, 10)],
        "startup_s": steps[0]["ts"] - launched,
        "after_s": finished - last["ts"],
    }


def run_child(workdir, label, mode, spec, env, timeout):
    """This file in a subprocess (--peer-child or --bare-child); it writes its steps to spec["out"]."""
    spec_path = os.path.join(workdir, "logs", f"{label}.spec.json")
    out_path = os.path.join(workdir, "logs", f"{label}.steps.json")
    with open(spec_path, "w") as f:
        json.dump({**spec, "out": out_path, "output_dir": os.path.join(workdir, "runs", label)}, f, indent=2)
    if os.path.exists(out_path):
        os.remove(out_path)
    child_env = dict(env, OMP_NUM_THREADS=str(spec["threads"]))
    if mode == "peer":
        child_env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                         HF_HOME=os.path.join(workdir, "hf-home"), DISABLE_TELEMETRY="1")
    launched, load_before = time.time(), os.getloadavg()[0]
    rc, wall, output = timed([sys.executable, os.path.abspath(__file__), f"--{mode}-child", spec_path],
                             os.path.join(workdir, "logs", f"{label}.log"), timeout, child_env)
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]]}
    if rc == 0 and os.path.exists(out_path):
        rec.update(summarise_steps(json.load(open(out_path))["steps"], spec["warmup"], spec["batch"], launched,
                                   time.time()))
    else:
        rec.update(ok=False, error=f"rc {rc}")
    rec.setdefault("ok", True)
    if not rec["ok"]:
        print(f"  {label} FAILED ({rec['error']}); output tail:\n{tail(output)}")
    return rec


def run_ours(workdir, label, spec, shards, env, timeout, keep_runs):
    """One `pipelines pretrain --kind diffusion` process; its steps from its MLflow run."""
    from mlflow.tracking import MlflowClient

    storage = os.path.join(workdir, "runs")
    run_name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [OURS_BIN, "pretrain", "--kind", "diffusion", "--shards", shards,
           "--text-encoder", f"models:/{CLIP_NAME}@champion", "--preset", spec["preset"],
           "--micro-batch", str(spec["batch"]), "--max-steps", str(spec["steps"]), "--seed", str(spec["seed"]),
           "--lr", str(spec["lr"]), "--warmup-steps", "0", "--min-lr-ratio", "1", "--weight-decay", "0",
           "--beta1", "0.9", "--beta2", "0.999", "--grad-clip", "1", "--snr-gamma", str(spec["snr_gamma"]),
           "--prediction", "epsilon", "--caption-dropout", "0", "--ema-decay", "0",
           "--checkpoint-every", str(spec["steps"] + 1), "--eval-samples", "2", "--sample-steps", "1",
           "--workers", "1", "--cpus-per-worker", str(spec["threads"]), "--no-use-gpu",
           "--storage", storage, "--run-name", run_name, "--max-failures", "0", "--no-register-model", "--quiet"]
    if spec["on_images"]:
        cmd += ["--autoencoder", f"models:/{AE_NAME}@champion"]
    cmd += spec["ours_args"]
    launched, load_before = time.time(), os.getloadavg()[0]
    rc, wall, output = timed(cmd, os.path.join(workdir, "logs", f"{label}.log"), timeout, env)
    rec = {"rc": rc, "wall_s": wall, "loadavg_1m": [load_before, os.getloadavg()[0]], "run_name": run_name}
    try:
        run_id = json.load(open(os.path.join(storage, run_name, "run.json")))["mlflow_run_id"]
        history = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "loss")
        steps = [{"step": m.step, "ts": m.timestamp / 1000, "loss": m.value} for m in history]
        rec.update(summarise_steps(steps, spec["warmup"], spec["batch"], launched, launched + wall))
        rec["mlflow_run_id"] = run_id
    except (OSError, ValueError, KeyError) as e:
        rec.update(ok=False, error=f"could not read the run's metrics: {e!r}")
    if rc != 0:
        rec.update(ok=False, error=f"rc {rc}")
    rec.setdefault("ok", True)
    if not rec["ok"]:
        print(f"  {label} FAILED ({rec['error']}); output tail:\n{tail(output)}")
    if not keep_runs:
        shutil.rmtree(os.path.join(storage, run_name), ignore_errors=True)
    return rec


# ---------------------------------------------------------------------------------------------- the children


def peer_child(spec_path):
    """diffusers' train_text_to_image.py as __main__, each `accelerator.log({"train_loss"})` timestamped."""
    spec = json.load(open(spec_path))
    import datasets  # noqa: F401 - the peer's libraries, imported before the shim is on the path (see below)
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401
    import torch
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    # The torchvision shim serves the script's own `from torchvision import transforms` only: transformers and
    # datasets take any importable `torchvision` for the real one (and then import its v2 API), so it joins
    # the path after they have looked.
    sys.path.insert(0, SHIMS)
    torch.set_num_threads(spec["threads"])
    steps = []
    original_log = Accelerator.log

    def log(self, values, step=None, log_kwargs=None):
        if "train_loss" in values:
            steps.append({"step": step, "ts": time.time(), "loss": float(values["train_loss"])})
        return original_log(self, values, step=step, log_kwargs=log_kwargs or {})

    Accelerator.log = log
    out = spec["output_dir"]
    sys.argv = [PEER, "--pretrained_model_name_or_path", spec["pipeline"], "--train_data_dir", spec["imagefolder"],
                "--resolution", str(spec["resolution"]), "--center_crop", "--image_interpolation_mode", "bicubic",
                "--train_batch_size", str(spec["batch"]), "--max_train_steps", str(spec["steps"]),
                "--learning_rate", str(spec["lr"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_weight_decay", "0", "--adam_epsilon", "1e-8",
                "--max_grad_norm", "1", "--snr_gamma", str(spec["snr_gamma"]), "--mixed_precision", "no",
                "--dataloader_num_workers", "0", "--seed", str(spec["seed"]), "--output_dir", out,
                "--checkpointing_steps", str(spec["steps"] + 1)]
    try:
        runpy.run_path(PEER, run_name="__main__")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    with open(spec["out"], "w") as f:
        json.dump({"steps": steps}, f)


def bare_child(spec_path):
    """The plain PyTorch loop over the latent shards' training split held in memory."""
    spec = json.load(open(spec_path))
    sys.path.insert(0, REPO)
    import numpy as np
    import torch

    from pipelines.train.data import is_heldout, open_shards
    from pipelines.train.diffusion import (DiffusionModelConfig, ObjectiveConfig, build_unet, diffusion_loss,
                                           encode_text, load_text_encoder, noise_schedule, read_latent_tar,
                                           step_generator)

    torch.set_num_threads(spec["threads"])
    rows = [(data, caption) for url in open_shards(spec["latents"]).tars for key, data, caption in read_latent_tar(url)
            if not is_heldout(key, HELDOUT_PERCENT)]
    latents = torch.from_numpy(np.stack([np.load(io.BytesIO(data)).astype(np.float32) for data, _ in rows]))
    captions = [caption for _, caption in rows]
    text_encoder, tokenizer = load_text_encoder(spec["clip"])
    objective = ObjectiveConfig(snr_gamma=spec["snr_gamma"], caption_dropout=0.0, ema_decay=0.0)
    unet = build_unet(DiffusionModelConfig(preset=spec["preset"]), latents.shape[1], latents.shape[2],
                      text_encoder.config.hidden_size, spec["seed"])
    decay = [p for p in unet.parameters() if p.ndim >= 2]
    no_decay = [p for p in unet.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8)
    noise = noise_schedule(objective)
    order = torch.Generator().manual_seed(spec["seed"])
    batch, queue, steps = spec["batch"], [], []
    unet.train()
    for step in range(spec["steps"]):
        if len(queue) < batch:  # a new epoch: a fresh permutation, as a shuffling loader would
            queue += torch.randperm(len(latents), generator=order).tolist()
        index, queue = queue[:batch], queue[batch:]
        x, texts = latents[index], [captions[i] for i in index]
        generator = step_generator(spec["seed"], 0, step, 0)
        eps = torch.randn(x.shape, generator=generator)
        timesteps = torch.randint(0, objective.train_timesteps, (batch,), generator=generator)
        states = encode_text(text_encoder, tokenizer, texts, "cpu")
        pred = unet(noise.add_noise(x, eps, timesteps), timesteps, encoder_hidden_states=states).sample
        loss = diffusion_loss(pred, eps, timesteps, noise.alphas_cumprod, objective)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"step": step + 1, "ts": time.time(), "loss": loss.item()})
    with open(spec["out"], "w") as f:
        json.dump({"steps": steps}, f)


def profile_steps(paths, spec, blocks, rounds):
    """`--profile`: in this one process, alternating blocks of `blocks` steps, the bare loop's step against the
    same step through our DeepSpeed engine (`start_engine`: ZeRO-0, one rank), on latents held in memory, and the
    bare step fed by our shard stream in the training thread or by `--loader-process`'s loader process. Per block
    the median wall and process CPU time (all threads) per step and the mean CPU time spent getting the batch.
    The cases share the process and alternate, so a burst of load hits them alike; still compare rounds whose
    load stayed near --cpus."""
    sys.path.insert(0, REPO)
    import numpy as np
    import torch
    import torch.distributed as dist

    from pipelines.train.data import is_heldout, open_shards
    from pipelines.train.diffusion import (DiffusionLoader, DiffusionModelConfig, DiffusionPretrainConfig,
                                           DiffusionStream, ObjectiveConfig, build_unet, diffusion_loss, encode_text,
                                           load_text_encoder, noise_schedule, read_latent_tar, step_generator)
    from pipelines.train.pretrain import lr_lambda, start_engine

    torch.set_num_threads(spec["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    shards = open_shards(paths["latents"])
    rows = [(data, caption) for url in shards.tars for key, data, caption in read_latent_tar(url)
            if not is_heldout(key, HELDOUT_PERCENT)]
    latents = torch.from_numpy(np.stack([np.load(io.BytesIO(data)).astype(np.float32) for data, _ in rows]))
    captions = [caption for _, caption in rows]
    text_encoder, tokenizer = load_text_encoder(paths["clip"])
    objective = ObjectiveConfig(snr_gamma=spec["snr_gamma"], caption_dropout=0.0, ema_decay=0.0)
    noise, batch, seed = noise_schedule(objective), spec["batch"], spec["seed"]
    config = DiffusionPretrainConfig.model_validate({
        "engine": {"micro_batch": batch, "max_steps": spec["steps"], "workers": 1},
        "optim": {"lr": spec["lr"], "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "beta1": 0.9,
                  "beta2": 0.999, "grad_clip": 1.0}})

    def model():
        unet = build_unet(DiffusionModelConfig(preset=spec["preset"]), latents.shape[1], latents.shape[2],
                          text_encoder.config.hidden_size, seed)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0)
        return unet, optimizer

    def loss_of(forward, x, texts, step):
        generator = step_generator(seed, 0, step, 0)
        eps = torch.randn(x.shape, generator=generator)
        timesteps = torch.randint(0, objective.train_timesteps, (batch,), generator=generator)
        states = encode_text(text_encoder, tokenizer, texts, "cpu")
        pred = forward(noise.add_noise(x, eps, timesteps), timesteps, encoder_hidden_states=states).sample
        return diffusion_loss(pred, eps, timesteps, noise.alphas_cumprod, objective)

    unet, optimizer = model()
    unet.train()

    def bare(x, texts, step):
        loss = loss_of(unet, x, texts, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    ours_unet, ours_optimizer = model()
    schedule = torch.optim.lr_scheduler.LambdaLR(ours_optimizer, lr_lambda(0, spec["steps"], 1.0))
    engine, update = start_engine(ours_unet, ours_optimizer, schedule, config, False, 1)
    engine.train()

    def ours(x, texts, step):
        loss = loss_of(engine, x, texts, step)
        update(loss)
        return loss.item()

    order = torch.Generator().manual_seed(seed)

    def in_memory():
        while True:
            index = torch.randperm(len(latents), generator=order).tolist()
            for i in range(0, len(index) - batch + 1, batch):
                yield latents[index[i:i + batch]], [captions[j] for j in index[i:i + batch]]

    def stream():
        return DiffusionStream(shards, latents=True, image_size=spec["resolution"],
                               latent_shape=tuple(latents.shape[1:]), caption_dropout=0.0, micro_batch=batch,
                               rank=0, world_size=1, seed=seed, shuffle_buffer=256,
                               heldout_percent=HELDOUT_PERCENT)

    sources = {"memory": in_memory(), "stream": iter(stream()), "loader": iter(DiffusionLoader(stream()))}
    cases = [("bare, latents in memory", bare, "memory"), ("ours' engine, latents in memory", ours, "memory"),
             ("bare, shard stream in the thread", bare, "stream"), ("bare, loader process", bare, "loader")]
    figures = {label: [] for label, _, _ in cases}
    for rnd in range(rounds):
        for label, step_fn, source in cases:
            walls, cpus, fetches = [], [], []
            for step in range(blocks):
                wall, cpu = time.perf_counter(), time.process_time()
                x, texts = next(sources[source])
                fetches.append(time.process_time() - cpu)
                step_fn(x, texts, step)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            kept = slice(min(5, blocks // 2), None)  # the first steps of a block warm its caches
            figures[label].append({"wall_ms": 1000 * statistics.median(walls[kept]),
                                   "cpu_ms": 1000 * statistics.median(cpus[kept]),
                                   "fetch_cpu_ms": 1000 * statistics.fmean(fetches[kept]),
                                   "loadavg_1m": os.getloadavg()[0]})
            f = figures[label][-1]
            print(f"round {rnd + 1}: {label:34s} wall {f['wall_ms']:6.1f} ms, CPU {f['cpu_ms']:6.1f} ms, getting "
                  f"the batch {f['fetch_cpu_ms']:5.2f} ms CPU a step (load {f['loadavg_1m']:.2f})", flush=True)
    print("\nmedians over the rounds (per step):")
    for label, per_round in figures.items():
        print(f"  {label:34s} wall {median([f['wall_ms'] for f in per_round]):6.1f} ms, CPU "
              f"{median([f['cpu_ms'] for f in per_round]):6.1f} ms, getting the batch "
              f"{median([f['fetch_cpu_ms'] for f in per_round]):5.2f} ms CPU")
    return figures


# ---------------------------------------------------------------------------------------------- main


def times(x):
    return "n/a" if x is None else f"{x:.2f}x"


def summarise(runs):
    good = [r for r in runs if r.get("ok")]
    if not good:
        return {"ok_runs": 0}
    keys = ("span_samples_per_s", "wall_s", "startup_s", "after_s", "loss_last10")
    windows = [r["loss_windows"] for r in good]
    return {"ok_runs": len(good), **{k: median([r.get(k) for r in good]) for k in keys},
            "loss_windows": [median(list(w)) for w in zip(*windows)]}


def save_results(workdir, args, cpus, spec, runs, seconds, complete):
    """Medians, ratios and every run's figures to WORKDIR/results.json; returns (medians, ratios, overhead)."""
    med = {label: summarise(rs) for label, rs in runs.items()}
    rate = {label: m.get("span_samples_per_s") for label, m in med.items()}
    ratios = {"ours_latents_over_peer": ratio(rate.get("ours-latents"), rate.get("peer")),
              "ours_images_over_peer": ratio(rate.get("ours-images"), rate.get("peer")),
              "ours_latents_over_bare": ratio(rate.get("ours-latents"), rate.get("bare"))}
    overhead = None if ratios["ours_latents_over_bare"] is None else 1 - ratios["ours_latents_over_bare"]
    results = {"args": {k: v for k, v in vars(args).items() if not k.endswith("_child")}, "complete": complete,
               "cpus": os.cpu_count(), "threads": cpus, "seconds": seconds, "spec": spec, "runs": runs,
               "medians": med, "ratios": ratios, "overhead_vs_bare": overhead}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return med, ratios, overhead


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="captioned shapes in the workload")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "sd"], help="UNet preset (both sides)")
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per step (ours --micro-batch, peer "
                                                                "--train_batch_size)")
    ap.add_argument("--vae", default="tiny", choices=["tiny", "small"],
                    help="the autoencoder: tiny (f2, 32 px: encoding is ~3%% of a step) or small (SD's VAE shape "
                         "scaled down, f4, 64 px: encoding ~30%% of a step, as in Stable Diffusion training)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of samples/s")
    ap.add_argument("--lr", type=float, default=5e-4, help="constant learning rate (no warm-up), all loops")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR-γ loss weighting, all loops (0: plain MSE)")
    ap.add_argument("--seed", type=int, default=1234, help="UNet init and data order, all loops")
    ap.add_argument("--runs", type=int, default=3, help="rounds, alternating the loops")
    ap.add_argument("--cpus", type=int, default=None, help="torch threads of every loop (default: all CPUs)")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated subset of {','.join(LOOPS)}")
    ap.add_argument("--workdir", default=os.path.join(REPO, ".bench", "train-diffusion"))
    ap.add_argument("--timeout", type=float, default=900, help="per-run limit in seconds")
    ap.add_argument("--keep-runs", action="store_true", help="keep ours' run folders (checkpoints, export)")
    ap.add_argument("--ours-args", default="", help="more options for ours' `pipelines pretrain`, "
                                                    "e.g. --ours-args=--loader-process")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of the loops: per-step CPU and wall of the bare step vs the same step through our "
                         "DeepSpeed engine, and of our shard stream and loader process, in one process, alternating "
                         "blocks of STEPS steps for --runs rounds")
    ap.add_argument("--peer-child", help=argparse.SUPPRESS)
    ap.add_argument("--bare-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_child:
        return peer_child(args.peer_child)
    if args.bare_child:
        return bare_child(args.bare_child)
    if args.warmup >= args.steps - 10:
        sys.exit(f"--warmup {args.warmup} must leave at least 10 measured steps of --steps {args.steps}")
    if not os.path.exists(PEER):
        sys.exit(f"{PEER} not found: the peer script lives in the shared folder beside the repository")
    loops = [lb.strip() for lb in args.loops.split(",") if lb.strip()]
    if not set(loops) <= set(LOOPS):
        sys.exit(f"--loops: unknown {sorted(set(loops) - set(LOOPS))}; choose from {', '.join(LOOPS)}")

    workdir = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    env.update(PIPELINES_HOME=os.path.join(workdir, "home"), MLFLOW_TRACKING_URI=f"sqlite:///{workdir}/mlflow.db",
               RAY_USAGE_STATS_ENABLED="0")
    cpus = args.cpus or os.cpu_count()
    paths = make_workload(workdir, args.images, args.preset, args.seed, env, args.timeout, args.vae)
    from diffusers import AutoencoderKL

    resolution = AutoencoderKL.load_config(paths["autoencoder"])["sample_size"]
    spec = {"preset": args.preset, "batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
            "lr": args.lr, "snr_gamma": args.snr_gamma, "seed": args.seed, "threads": cpus,
            "resolution": resolution, "ours_args": args.ours_args.split(), **paths}

    if args.profile:
        figures = profile_steps(paths, spec, args.profile, args.runs)
        with open(os.path.join(workdir, "profile.json"), "w") as f:
            json.dump({"spec": spec, "blocks": args.profile, "rounds": figures}, f, indent=2)
        return None
    runs = {label: [] for label in loops}
    started = time.perf_counter()
    for rnd in range(args.runs):
        order = loops[rnd % len(loops):] + loops[:rnd % len(loops)]  # rotate the order each round
        for label in order:
            print(f"round {rnd + 1}/{args.runs}: {label} ...", flush=True)
            name = f"{label}-{rnd}"
            if label in ("peer", "bare"):
                r = run_child(workdir, name, label, spec, env, args.timeout)
            else:
                shards = paths["images"] if label == "ours-images" else paths["latents"]
                r = run_ours(workdir, name, {**spec, "on_images": label == "ours-images"}, shards, env,
                             args.timeout, args.keep_runs)
            runs[label].append(r)
            print(f"  {fmt(r.get('span_samples_per_s'))} samples/s, loss(last 10) {fmt(r.get('loss_last10'), 4)}, "
                  f"wall {fmt(r.get('wall_s'))}s (start-up {fmt(r.get('startup_s'))}s), "
                  f"load {r['loadavg_1m'][0]:.2f} -> {r['loadavg_1m'][1]:.2f}", flush=True)
            # after every run, so an interrupted benchmark keeps what it measured
            save_results(workdir, args, cpus, spec, runs, time.perf_counter() - started, complete=False)
    total_s = time.perf_counter() - started
    med, ratios, overhead = save_results(workdir, args, cpus, spec, runs, total_s, complete=True)
    rate = {label: m.get("span_samples_per_s") for label, m in med.items()}
    loads = [x for rs in runs.values() for r in rs for x in r["loadavg_1m"]]

    print(f"\n## Diffusion training: {args.preset} UNet, {resolution} px images -> latents, batch {args.micro_batch}, "
          f"{args.steps} steps (samples/s over steps {args.warmup + 1}-{args.steps}), {args.runs} round(s), "
          f"{cpus} threads on {os.cpu_count()} CPUs\n")
    print("| loop | samples/s | vs peer | wall (s) | start-up (s) | after (s) | loss, last 10 steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in loops:
        m = med[label]
        if not m.get("ok_runs"):
            print(f"| {label} | failed | | | | | |")
            continue
        vs = times(ratio(m["span_samples_per_s"], rate.get("peer")))
        print(f"| {label} | {fmt(m['span_samples_per_s'])} | {vs} | {fmt(m['wall_s'])} | {fmt(m['startup_s'])} "
              f"| {fmt(m['after_s'])} | {fmt(m['loss_last10'], 4)} |")
    print(f"\nGoals: ours-latents / peer >= 1.3x: {times(ratios['ours_latents_over_peer'])}; "
          f"ours-latents overhead vs bare <= 5%: {pct(overhead)}.")
    print("Loss curve (median over rounds of the mean loss per 10-step window):")
    for label in loops:
        if med[label].get("ok_runs"):
            print(f"  {label:13s} " + " ".join(f"{x:.3f}" for x in med[label]["loss_windows"]))
    if loads:
        print(f"\n1-minute load average around the runs: {min(loads):.2f} - {max(loads):.2f} on {os.cpu_count()} "
              f"CPUs. This VM is shared with other work and noisy: compare rounds whose load stayed near {cpus}. "
              f"Whole benchmark {total_s / 60:.1f} min.")
    print(f"raw figures: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    main()
