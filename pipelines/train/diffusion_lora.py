"""`pipelines finetune --base models:/NAME@ALIAS` on a registered diffusion model: a LoRA on the denoiser's
attention (the DreamBooth use: a handful of images of one subject, captioned with a trigger word), on the same
Ray Train + DeepSpeed engine, checkpoints and resume as every other training job.

The driver (`finetune_diffusion`, which `finetune.finetune` hands a diffusion base to) pins the base to its
version and copies its pipeline folder once into `{storage}/bases/NAME/VERSION`, turns a folder of captioned
images into image shards once (`prepare_images`), opens the MLflow run and starts the workers. Each worker wraps
the base's UNet with peft (LoRA on `to_q`, `to_k`, `to_v`, `to_out.0`; the UNet, autoencoder and text encoder
frozen), encodes each batch of images with the base's autoencoder on the fly (a handful of images needs no
latent shards) and trains on the base's own objective: its scheduler's noise levels and prediction type, with
min-SNR-γ weighting as pretraining has. The held-out denoising loss is measured before and after training on
fixed noise and noise levels per held-out image, so the two are comparable (and `champion` moves on it).

The export is peft's adapter folder of the UNet (`adapter_config.json`, `adapter_model.safetensors`), registered
with `registry.register_adapter` pinned to the base version, tagged `adapter_for=diffusion`;
`load_diffusion_adapter` loads it into a base pipeline through diffusers' own LoRA support.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pipelines.errors import PipelineError
from pipelines.runtime import filesystem, settings
from pipelines.shards import IMAGE_EXTS, MANIFEST, ShardOutput, absolute, is_local
from pipelines.train.data import ShardSet, open_shards
from pipelines.train.diffusion import ObjectiveConfig, diffusion_loss, encode_text, quiet_progress, step_generator
from pipelines.train.finetune import FinetuneConfig, FinetuneResult, LoraSettings, checkpoint_state, peak_rss_mb
from pipelines.train.pretrain import (DS_TAG, RUN_FILE, MetricsLog, fit, init_train_ray, local_copy, lr_lambda,
                                      resources, save_checkpoint, start_engine, storage_root, worker_context,
                                      write_json, zero_label)

# The denoiser's attention projections (self- and cross-attention): diffusers' DreamBooth LoRA script's choice.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER_FOR_TAG = "adapter_for"  # on the registered version: what kind of base the adapter is for
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's key prefix in a saved adapter of a wrapped model
EVAL_TIMESTEPS = 8  # noise levels each held-out image is scored at, spread over the whole schedule
DIFFUSION_KIND = "diffusion"


# -- the driver -----------------------------------------------------------------------------------

def is_diffusion_base(base: str) -> bool:
    """Whether `base` (models:/NAME@ALIAS or /VERSION, or a folder) is a diffusion model (its registered
    version's `pipelines.kind`, or a diffusers pipeline folder)."""
    if base.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        from pipelines.train import registry

        registry.configure_tracking()
        name, version = registry.resolve_version(base)
        return MlflowClient().get_model_version(name, str(version)).tags.get("pipelines.kind") == DIFFUSION_KIND
    fs, path = filesystem(absolute(base))
    return fs.isfile(f"{path}/model_index.json")


def finetune_diffusion(config: FinetuneConfig, run_name: str, saved: dict[str, Any] | None) -> FinetuneResult:
    """Train a LoRA adapter on a diffusion base's denoiser as the config says (the run `run_name`, resumed
    from `saved` when given); export it and register it pinned to the base version."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import registry

    console = Console(quiet=config.quiet, stderr=True, soft_wrap=True)
    storage = storage_root(config.storage)
    fs, _ = filesystem(storage)
    run_dir = f"{storage}/{run_name}"
    if config.lora.method != "lora":
        raise PipelineError("lora.method full is not supported for a diffusion base: use lora")
    if config.lora.merge:
        raise PipelineError("lora.merge is not supported for a diffusion base: load the adapter into the base "
                            "with load_diffusion_adapter")
    if config.engine.zero_stage == 3:
        raise PipelineError("engine.zero_stage 3 is not supported for a diffusion LoRA (the adapter is small: "
                            "use 0-2)")
    if not config.examples.data:
        raise PipelineError("no examples: give --data (a folder of captioned images, or image shards)")

    registry.configure_tracking()
    base_uri, base_dir = (saved["base"], saved["base_dir"]) if saved else resolve_base(config.base, storage)
    shards = prepare_images(absolute(config.examples.data), storage)
    if saved and saved["shards_digest"] != shards.digest:
        raise PipelineError(f"run {run_name} was trained on examples with digest {saved['shards_digest'][:12]}; "
                            f"{config.examples.data} now has {shards.digest[:12]}: start a new run instead")
    init_train_ray()
    use_gpu, cpus = resources(config)

    params = config.model_dump(mode="json")
    with registry.training_run(config.registry.experiment, run_name, {**params, "base_pinned": base_uri},
                               tags={"pipelines.stage": "finetune", "pipelines.run_dir": run_dir,
                                     "pipelines.base_model": base_uri},
                               run_id=saved["mlflow_run_id"] if saved else None) as mlflow_run_id:
        if saved is None:
            registry.log_shards_input(shards.url, shards.manifest)
        write_json(fs, f"{run_dir}/{RUN_FILE}", {
            "config": params, "mlflow_run_id": mlflow_run_id, "shards_digest": shards.digest, "base": base_uri,
            "base_dir": base_dir, "workers": config.engine.workers})
        console.print(f"[bold]finetune[/bold] {run_name}: LoRA r={config.lora.rank} on the denoiser of {base_uri} "
                      f"({shards.manifest.get('samples', '?')} images), {config.engine.workers} worker(s) "
                      f"({'GPU' if use_gpu else f'{cpus} CPU each'}), {zero_label(config.engine)}, "
                      f"{config.engine.max_steps} steps; MLflow run {mlflow_run_id}")
        result = fit(diffusion_lora_loop, {"config": params, "base_dir": base_dir, "shards": shards.url,
                                           "threads": cpus, "mlflow_run_id": mlflow_run_id,
                                           "tracking_uri": settings().mlflow_tracking_uri},
                     config.engine, run_name, storage, use_gpu, cpus)
        metrics = dict(result.metrics or {})
        step = int(metrics.get("step", 0))
        if metrics.get("stopped"):
            console.print(f"stopped after step {step}; continue with --resume {run_name}")
            return FinetuneResult(run_name, run_dir, mlflow_run_id, base_uri, step, True, metrics)

        adapter_dir = f"{run_dir}/adapter"
        with result.checkpoint.as_directory() as checkpoint_dir:
            export_diffusion_adapter(checkpoint_dir, base_dir, adapter_dir, config.lora)
        final = {k: float(metrics[k]) for k in ("heldout_loss_before", "heldout_loss") if metrics.get(k) is not None}
        registry.log_metrics(final, step=step)
        out = FinetuneResult(run_name, run_dir, mlflow_run_id, base_uri, step, False, metrics, adapter_dir)
        if config.registry.register_model:
            if "heldout_loss" not in final:
                raise PipelineError("no held-out images to measure the loss on: raise --heldout-percent (or give "
                                    "more images), or pass --no-register-model")
            lineage = {"examples": shards.url, "examples_digest": shards.digest, "run_dir": run_dir}
            with local_copy(adapter_dir) as local_adapter:
                out.registered = registry.register_adapter(
                    local_adapter, config.registry.model_name, run_id=mlflow_run_id, base_uri=base_uri,
                    metric="heldout_loss", value=final["heldout_loss"], lineage=lineage)
            MlflowClient().set_model_version_tag(out.registered.name, str(out.registered.version), ADAPTER_FOR_TAG,
                                                 DIFFUSION_KIND)
        console.print(f"done: {step} steps, held-out denoising loss {final.get('heldout_loss_before', math.nan):.4f}"
                      f" -> {final.get('heldout_loss', math.nan):.4f}; {adapter_dir}"
                      + (f"; registered {out.registered.uri}{' (champion)' if out.registered.champion else ''}"
                         if out.registered else ""))
        return out


def resolve_base(base: str, storage: str) -> tuple[str, str]:
    """(the pinned base, the pipeline folder workers load it from): a registered version is copied once into
    `{storage}/bases/NAME/VERSION`, where later runs on the same version find it; a folder is used as is."""
    from pipelines.train import registry

    if not base.startswith("models:/"):
        return absolute(base), absolute(base)
    name, version = registry.resolve_version(base)
    pinned = f"models:/{name}/{version}"
    target = f"{storage}/bases/{name}/{version}"
    fs, path = filesystem(target)
    if fs.exists(f"{path}/model_index.json"):
        return pinned, target
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.registered_folder(DIFFUSION_KIND, pinned, tmp)
        # model_index.json last: a half-copied base is never found
        if is_local(fs):
            staged = f"{path}.tmp-{os.getpid()}"
            fs.makedirs(staged, exist_ok=True)
            fs.put(folder.rstrip("/") + "/", staged, recursive=True)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.mv(staged, path, recursive=True)
        else:  # an object store has no rename (mv copies, in any order): upload in place
            for entry in sorted(os.listdir(folder), key=lambda entry: entry == "model_index.json"):
                fs.put(os.path.join(folder, entry), f"{path}/{entry}", recursive=True)
    return pinned, target


# -- examples: a folder of captioned images as shards ---------------------------------------------

def folder_images(folder: str) -> list[tuple[str, bytes, str]]:
    """(file name, image bytes, caption) of a folder of captioned images, in file-name order: diffusers'
    imagefolder layout (`metadata.jsonl` rows of `file_name` and `text`), else each `NAME.jpg` (any image
    the crawl keeps) beside its caption `NAME.txt`. PipelineError naming the file for anything missing."""
    from PIL import Image, UnidentifiedImageError

    fs, path = filesystem(folder)
    rows: list[tuple[str, str]] = []  # (file name, caption)
    if fs.isfile(f"{path}/metadata.jsonl"):
        with fs.open(f"{path}/metadata.jsonl", "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PipelineError(f"{folder}/metadata.jsonl:{n}: not JSON ({exc.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) \
                        or not isinstance(row.get("text"), str):
                    raise PipelineError(f"{folder}/metadata.jsonl:{n}: needs 'file_name' and 'text'")
                rows.append((row["file_name"], row["text"]))
    else:
        for entry in sorted(fs.ls(path, detail=False)):
            name = entry.rsplit("/", 1)[-1]
            stem, _, ext = name.rpartition(".")
            if ext.lower() not in IMAGE_EXTS:
                continue
            if not fs.isfile(f"{path}/{stem}.txt"):
                raise PipelineError(f"{folder}/{name}: no caption (expected {stem}.txt beside it)")
            rows.append((name, fs.cat_file(f"{path}/{stem}.txt").decode("utf-8").strip()))
    images = []
    for name, caption in sorted(rows):
        if not fs.isfile(f"{path}/{name}"):
            raise PipelineError(f"{folder}/{name}: no such image")
        data = fs.cat_file(f"{path}/{name}")
        try:
            Image.open(io.BytesIO(data)).verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise PipelineError(f"{folder}/{name}: not an image ({exc})") from None
        if not caption.strip():
            raise PipelineError(f"{folder}/{name}: empty caption")
        images.append((name, data, caption.strip()))
    if not images:
        raise PipelineError(f"{folder}: no captioned images (NAME.jpg + NAME.txt, or a metadata.jsonl of "
                            "file_name and text)")
    return images


def prepare_images(data: str, storage: str) -> ShardSet:
    """Image shards for `data`: a shard folder (`pipelines crawl images` output) as is, or a folder of captioned
    images (`folder_images`) written as one image shard once, under `{storage}/datasets/{sha256 of the images
    and captions}` (the same images are not converted again)."""
    from pipelines.ingest.images import METADATA_SCHEMA
    from pipelines.ingest.shards import metadata_table, shard_stats
    from pipelines.shards import write_manifest, write_shard

    fs, path = filesystem(data)
    if not fs.isdir(path):
        raise PipelineError(f"{data}: no such folder (give a folder of captioned images, or image shards)")
    if fs.isfile(f"{path}/{MANIFEST}"):
        shards = open_shards(data)
        if shards.manifest.get("kind") != "images":
            raise PipelineError(f"{data}: {shards.manifest.get('kind') or 'unknown'} shards; a diffusion LoRA "
                                "trains on image shards (or a folder of captioned images)")
        return shards
    images = folder_images(data)
    digest = hashlib.sha256()
    for name, image, caption in images:
        for part in (name.encode(), image, caption.encode()):
            digest.update(hashlib.sha256(part).digest())
    out = f"{storage}/datasets/{digest.hexdigest()[:16]}"
    out_fs, out_path = filesystem(out)
    if out_fs.isfile(f"{out_path}/{MANIFEST}"):
        return open_shards(out)
    started = time.time()
    keys = [f"{i:06d}" for i in range(len(images))]
    files = [(key, {name.rpartition(".")[2].lower().replace("jpeg", "jpg"): image, "txt": caption.encode(),
                    "json": json.dumps({"file_name": name}).encode()})
             for key, (name, image, caption) in zip(keys, images, strict=True)]
    metas = [{"key": key, "url": name, "caption": caption, "status": "success", "bytes": len(image),
              "sha256": hashlib.sha256(image).hexdigest()}
             for key, (name, image, caption) in zip(keys, images, strict=True)]
    output = ShardOutput(out)
    stats = [write_shard(output, 0, files, metadata_table(metas, METADATA_SCHEMA),
                         shard_stats(digest.hexdigest(), metas, started))]
    write_manifest(output, "images", {"folder": absolute(data)}, digest.hexdigest(), stats, {},
                   {"converted_from": {"path": absolute(data), "sha256": digest.hexdigest()}})
    return open_shards(out)


# -- the workers ----------------------------------------------------------------------------------

def lora_config(settings_: LoraSettings) -> Any:
    """peft's LoraConfig for the denoiser (its attention projections unless the config names others)."""
    from peft import LoraConfig

    return LoraConfig(r=settings_.rank, lora_alpha=settings_.alpha, lora_dropout=settings_.lora_dropout,
                      target_modules=settings_.target_modules or DEFAULT_TARGETS)


def base_objective(scheduler_config: Any) -> tuple[ObjectiveConfig, Any]:
    """The base's training objective, read from its scheduler's config (noise levels, prediction type), and
    the DDPM schedule that noises with it. Min-SNR-γ is pretraining's default; no caption dropout (every
    image carries the trigger)."""
    from diffusers import DDPMScheduler

    c = scheduler_config
    objective = ObjectiveConfig(prediction=c["prediction_type"], train_timesteps=c["num_train_timesteps"],
                                caption_dropout=0.0, ema_decay=0.0)
    noise = DDPMScheduler(num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"],
                          beta_end=c["beta_end"], beta_schedule=c["beta_schedule"],
                          trained_betas=c.get("trained_betas"), prediction_type=c["prediction_type"],
                          steps_offset=c.get("steps_offset", 0))
    return objective, noise


def diffusion_lora_loop(args: dict[str, Any]) -> None:
    """One Ray Train worker: peft on the base's UNet, DeepSpeed, the loop, held-out loss before and after."""
    import ray.train
    import torch
    import torch.distributed as dist
    from peft import get_peft_model

    from pipelines.train.diffusion import DiffusionStream, load_diffusion

    config = FinetuneConfig.model_validate(args["config"])
    e, o, x = config.engine, config.optim, config.examples
    rank, world, device, bf16 = worker_context(e, args["threads"])

    with local_copy(args["base_dir"]) as base_dir:
        base = load_diffusion(base_dir, device=str(device))  # frozen: only the LoRA matrices train
    vae, text_encoder, tokenizer = base.vae.requires_grad_(False), base.text_encoder.requires_grad_(False), base.tokenizer
    objective, noise = base_objective(base.scheduler.config)
    torch.manual_seed(e.seed)  # the LoRA matrices' init
    model = get_peft_model(base.unet, lora_config(config.lora))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8, weight_decay=o.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps, o.min_lr_ratio))
    engine, update = start_engine(model, optimizer, schedule, config, bf16, world)
    dtype = torch.bfloat16 if bf16 else torch.float32

    shards = open_shards(args["shards"])
    stream = DiffusionStream(shards, latents=False, image_size=vae.config.sample_size, caption_dropout=0.0,
                             micro_batch=e.micro_batch, rank=rank, world_size=world, seed=e.seed,
                             shuffle_buffer=x.shuffle_buffer, heldout_percent=x.heldout_percent)
    heldout = HeldoutDenoising(shards, x.heldout_percent, e.eval_batches * e.micro_batch, vae, text_encoder,
                               tokenizer, noise, objective, e.seed)

    def evaluate() -> float | None:
        return heldout.loss(engine, rank, world, device, dtype)

    step, before = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
            state = json.loads(Path(d, "state.json").read_text())
            step, before = state["step"], state.get("heldout_loss_before")
            stream.load_state_dict(json.loads(Path(d, f"data-rank{rank}.json").read_text()))
    else:
        before = evaluate()

    metrics_log = MetricsLog(args) if rank == 0 else None
    if metrics_log and checkpoint:
        metrics_log.add(step, {"restored_from_step": step})
        metrics_log.flush()
    scaling = vae.config.scaling_factor
    batches = iter(stream)
    engine.train()
    stop_at = min(e.max_steps, e.stop_after or e.max_steps)
    while step < stop_at:
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(e.grad_accum):
            pixels, captions = next(batches)
            generator = step_generator(e.seed, rank, step, micro)
            with torch.no_grad():  # the posterior mean, as `pipelines encode` writes the base's latents
                latents = vae.encode(pixels.to(device)).latent_dist.mean * scaling
            eps = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, objective.train_timesteps, (latents.shape[0],), generator=generator).to(device)
            noisy = noise.add_noise(latents, eps, timesteps)
            target = eps if objective.prediction == "epsilon" else noise.get_velocity(latents, eps, timesteps)
            states = encode_text(text_encoder, tokenizer, captions, device)
            pred = engine(noisy.to(dtype), timesteps, encoder_hidden_states=states.to(dtype)).sample
            loss = diffusion_loss(pred, target, timesteps, noise.alphas_cumprod, objective)
            update(loss)
            total += loss.detach().float()
        step += 1
        if world > 1:
            dist.all_reduce(total)
        loss_value = total.item() / (e.grad_accum * world)
        seconds = time.perf_counter() - started
        if metrics_log:
            metrics_log.add(step, {"loss": loss_value, "lr": schedule.get_last_lr()[0],
                                   "samples_per_s": world * e.micro_batch * e.grad_accum / seconds, "step_s": seconds})
        last = step == stop_at
        if step % e.checkpoint_every == 0 or last:
            report = {"step": step, "loss": loss_value, "stopped": last and step < e.max_steps,
                      "heldout_loss_before": before}
            if last and step == e.max_steps:
                report["heldout_loss"] = evaluate()
                engine.train()
            if metrics_log:
                metrics_log.flush()
            save_checkpoint(engine, stream, rank, step, report, {"heldout_loss_before": before}, exclude_frozen=True)
    if metrics_log:
        metrics_log.add(step, {"peak_rss_mb": peak_rss_mb(), "trainable_parameters": sum(p.numel() for p in trainable)})
        metrics_log.close()


class HeldoutDenoising:
    """The denoising loss on the held-out images (at most `limit`, by key as every stream holds them out):
    each image's latents (the posterior mean) noised at `EVAL_TIMESTEPS` fixed levels spread over the
    schedule, with noise drawn from (seed, key), so every evaluation, before and after training, scores the
    same problems. Each rank scores every world-th image; the mean is over all."""

    def __init__(self, shards: ShardSet, heldout_percent: float, limit: int, vae: Any, text_encoder: Any,
                 tokenizer: Any, noise: Any, objective: ObjectiveConfig, seed: int):
        from pipelines.train.autoencoder import image_pixels
        from pipelines.train.clip import heldout_pairs

        self.pairs = heldout_pairs(shards, heldout_percent, limit) if limit > 0 else []
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.noise, self.objective, self.seed = noise, objective, seed
        self.pixels = image_pixels

    def loss(self, engine: Any, rank: int, world: int, device: Any, dtype: Any) -> float | None:
        import torch
        import torch.distributed as dist

        sums = torch.zeros(2, device=device, dtype=torch.float64)
        levels = torch.linspace(0, self.objective.train_timesteps - 1, EVAL_TIMESTEPS).round().long().to(device)
        engine.eval()
        with torch.no_grad():
            for key, data, caption in self.pairs[rank::world]:
                x = torch.from_numpy(self.pixels(data, self.vae.config.sample_size))[None].to(device)
                latents = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
                latents = latents.expand(EVAL_TIMESTEPS, *latents.shape[1:])
                generator = torch.Generator().manual_seed(
                    int.from_bytes(hashlib.blake2b(f"{self.seed}/{key}".encode(), digest_size=8).digest(), "big")
                    % 2**63)
                eps = torch.randn(latents.shape, generator=generator).to(device)
                noisy = self.noise.add_noise(latents, eps, levels)
                target = eps if self.objective.prediction == "epsilon" else self.noise.get_velocity(latents, eps,
                                                                                                      levels)
                states = encode_text(self.text_encoder, self.tokenizer, [caption] * EVAL_TIMESTEPS, device)
                pred = engine(noisy.to(dtype), levels, encoder_hidden_states=states.to(dtype)).sample
                loss = diffusion_loss(pred, target, levels, self.noise.alphas_cumprod, self.objective)
                sums += torch.tensor([loss.double().item(), 1.0], device=device, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        return (sums[0] / sums[1]).item() if sums[1] > 0 else None


# -- export and loading ---------------------------------------------------------------------------

def export_diffusion_adapter(checkpoint_dir: str, base_dir: str, adapter_dir: str, settings_: LoraSettings) -> None:
    """The adapter folder (peft's `adapter_config.json` + `adapter_model.safetensors` of the UNet's LoRA)
    from the last checkpoint."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    quiet_progress()
    state = {k: v for k, v in checkpoint_state(checkpoint_dir, exclude_frozen=True).items() if "lora_" in k}
    with local_copy(base_dir) as local_base:
        model = get_peft_model(UNet2DConditionModel.from_pretrained(f"{local_base}/unet"), lora_config(settings_))
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(state) != expected:
        raise RuntimeError(f"checkpoint {checkpoint_dir}: LoRA weights {sorted(set(state) ^ expected)[:4]} "
                           "missing or unexpected")
    model.load_state_dict(state, strict=False)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)  # peft saves the adapter only
        fs, path = filesystem(adapter_dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(out + "/", path, recursive=True)


def load_diffusion_adapter(pipe: Any, adapter: str, adapter_name: str = "default", scale: float = 1.0) -> Any:
    """Load a diffusion LoRA adapter (a folder from `export_diffusion_adapter`, or its registered
    `models:/NAME@ALIAS`) into `pipe`'s UNet through diffusers' LoRA support, active at `scale`; return `pipe`.
    Diffusers' adapter calls then apply (`pipe.set_adapters`, `pipe.unload_lora_weights`, ...)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    folder = adapter
    if adapter.startswith("models:/"):
        from pipelines.train.registry import load_adapter

        folder, _ = load_adapter(adapter)
    if not Path(folder, "adapter_config.json").is_file() or not Path(folder, ADAPTER_WEIGHTS).is_file():
        raise PipelineError(f"{adapter}: not a LoRA adapter folder (needs adapter_config.json, {ADAPTER_WEIGHTS})")
    lora = LoraConfig.from_pretrained(folder)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(Path(folder, ADAPTER_WEIGHTS))).items()}
    targets = lora.target_modules if isinstance(lora.target_modules, str) else sorted(lora.target_modules)
    pipe.unet.load_lora_adapter(state, prefix=None, adapter_name=adapter_name,
                                metadata={"r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": targets,
                                          "lora_dropout": lora.lora_dropout})
    pipe.set_adapters([adapter_name], [scale])
    return pipe
