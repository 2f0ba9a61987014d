"""`pipelines pretrain --kind diffusion`: a text-conditioned latent diffusion model (diffusers' UNet2DConditionModel)
trained on Ray Train + DeepSpeed, from the latent shards of `pipelines encode` (or from image shards, encoding each
batch with the autoencoder on the fly, for comparison).

The pieces around the denoiser are registered models, frozen: the autoencoder (`pipelines pretrain --kind
autoencoder`) that made the latents and decodes samples, and a CLIP (`pipelines pretrain --kind clip`) whose text
tower conditions the denoiser through cross-attention, as Stable Diffusion's does. A new run pins both (their
exact versions are copied into the run), so a resume trains against the same ones.

Training follows Stable Diffusion's recipe: DDPM noising with ε- or v-prediction, min-SNR-γ loss weighting
(Hang et al. 2023), caption dropout (an empty caption) so the model also learns the unconditional prediction
that classifier-free guidance needs, and an exponential moving average of the weights. The EMA is kept on every
rank from the whole parameters (ZeRO-1/2 gather them after each step, so every rank holds the same EMA), saved
by rank 0 with each checkpoint and restored on resume; the export uses it.

Evaluation, every `eval_every` steps and at the end: images generated for held-out captions with a few-step
sampler and guidance, scored with the CLIP: FD-CLIP against the held-out real images (the Fréchet distance on
CLIP image features: Inception's weights cannot be downloaded here, so it is not comparable with published FIDs)
and the CLIP score of each image against its caption; a grid of samples goes to MLflow. `champion` moves on
FD-CLIP. The export is a diffusers pipeline folder (`StableDiffusionPipeline`: unet, vae, text_encoder,
tokenizer, scheduler, model_index.json) that `DiffusionPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pipelines.errors import PipelineError
from pipelines.runtime import failpoint, filesystem
from pipelines.shards import TAR_ERRORS, read_tar
from pipelines.train.autoencoder import image_pixels
from pipelines.train.clip import BatchLoader, ImageCaptionStream, heldout_pairs, read_image_tar, stream_batches
from pipelines.train.data import ShardSet, is_heldout, open_shards
from pipelines.train.diffusion_config import (ConditioningConfig, DiffusionDataConfig,  # noqa: F401
                                              DiffusionModelConfig, DiffusionPretrainConfig, ObjectiveConfig,
                                              SamplingConfig)
from pipelines.train.pretrain import (DS_TAG, MetricsLog, Pretraining, PretrainResult, drive, local_copy, lr_lambda,
                                      save_checkpoint, start_engine, worker_context)

log = logging.getLogger(__name__)

FD_METRIC = "heldout_fd_clip"
EMA_FILE = "ema.safetensors"
SOURCES_FILE = "sources.json"  # in the run's frozen folder and the export: the CLIP and autoencoder versions

# Denoiser shapes by preset: (block_out_channels, layers_per_block, attention_head_dim, cross-attention levels).
# `sd` is Stable Diffusion 1.x's UNet (860M parameters with its 768-wide text encoder).
UNET_PRESETS: dict[str, tuple[tuple[int, ...], int, int, int]] = {
    "tiny": ((32, 64), 1, 8, 2),
    "small": ((64, 128, 256), 2, 8, 3),
    "sd": ((320, 640, 1280, 1280), 2, 8, 3),
}


# -- models ---------------------------------------------------------------------------------------

def build_unet(config: DiffusionModelConfig, latent_channels: int, latent_size: int, cross_attention_dim: int,
               seed: int = 0) -> Any:
    """A freshly initialised UNet2DConditionModel of `config`'s preset for latents of that shape."""
    import torch
    from diffusers import UNet2DConditionModel

    channels, layers, head_dim, attention_levels = UNET_PRESETS[config.preset]
    down = tuple("CrossAttnDownBlock2D" if i < attention_levels else "DownBlock2D" for i in range(len(channels)))
    up = tuple("CrossAttnUpBlock2D" if i >= len(channels) - attention_levels else "UpBlock2D"
               for i in range(len(channels)))
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=channels, layers_per_block=layers, down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, attention_head_dim=head_dim,
        norm_num_groups=min(32, channels[0] // 4))


def noise_schedule(objective: ObjectiveConfig, sampler: bool = False) -> Any:
    """Stable Diffusion's noise levels (scaled-linear betas 0.00085..0.012): the DDPM schedule that training
    noises with, or the DPM-Solver++ sampler on the same levels."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    kind = DPMSolverMultistepScheduler if sampler else DDPMScheduler
    return kind(num_train_timesteps=objective.train_timesteps, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012, prediction_type=objective.prediction, steps_offset=1)


def load_text_encoder(clip_dir: str) -> tuple[Any, Any]:
    """The CLIP folder's text tower as transformers' CLIPTextModel (what diffusers' pipelines use) and its
    tokenizer, padding to the tower's length."""
    from transformers import CLIPModel, CLIPTextModel, PreTrainedTokenizerFast

    clip = CLIPModel.from_pretrained(clip_dir)
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())  # (transformers 5: the tower itself, no .text_model)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(clip_dir)
    tokenizer.model_max_length = clip.config.text_config.max_position_embeddings
    return text.eval().requires_grad_(False), tokenizer


def encode_text(text_encoder: Any, tokenizer: Any, captions: list[str], device: Any) -> Any:
    """Per-token states of the captions, exactly as diffusers' StableDiffusionPipeline computes them."""
    import torch

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(device))[0]


def latent_dims(shards: ShardSet) -> tuple[int, int]:
    """(channels, side) of the first latent in `shards`."""
    for url in shards.tars:
        for _, data, _ in read_latent_tar(url)[:1]:
            shape = np.load(io.BytesIO(data)).shape
            if len(shape) != 3 or shape[1] != shape[2]:
                raise PipelineError(f"{url}: latents of shape {shape}, expected [channels, side, side]")
            return shape[0], shape[1]
    raise PipelineError(f"{shards.url}: no latents in any shard")


def latent_shape(vae_config: Any) -> tuple[int, int]:
    """(channels, side) of the latents `vae_config`'s autoencoder makes of its `sample_size` images."""
    return vae_config.latent_channels, vae_config.sample_size // 2 ** (len(vae_config.block_out_channels) - 1)


class Ema:
    """The exponential moving average of a module's parameters, in fp32: after each optimizer step,
    ema = d * ema + (1 - d) * param with d = `decay` (or min(decay, (1+step)/(10+step)) with warmup)."""

    def __init__(self, module: Any, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def update(self, module: Any, step: int) -> None:
        import torch

        d = self.decay_at(step)
        with torch.no_grad():
            for name, p in module.named_parameters():
                self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in self.shadow.items()}, path)

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        loaded = load_file(path)
        if loaded.keys() != self.shadow.keys():
            raise PipelineError(f"{path}: EMA weights of another model")
        self.shadow = loaded


# -- data -----------------------------------------------------------------------------------------

def read_latent_tar(url: str, shape: tuple[int, ...] | None = None) -> list[tuple[str, bytes, str]]:
    """(key, latent .npy bytes, caption) of every sample of a latent shard tar, in tar order; a tar that cannot
    be read counts as empty, with a warning. A latent that is not a finite [C, H, W] float array, or (given
    `shape`) not of that shape, is skipped with a warning: one bad sample or tar does not stop a run."""
    try:
        samples = read_tar(url, ("latent.npy", "txt"))
    except TAR_ERRORS as exc:
        log.warning("%s: cannot read, skipped (%s: %s)", url, type(exc).__name__, exc)
        return []
    rows = [(key, s["latent.npy"], s["txt"].decode("utf-8", "replace")) for key, s in samples.items()
            if "latent.npy" in s and "txt" in s and _is_latent(s["latent.npy"], shape)]
    skipped = sum("latent.npy" in s and "txt" in s for s in samples.values()) - len(rows)
    if skipped:
        wanted = f"of shape {list(shape)}" if shape else "[C, H, W]"
        log.warning("%s: %d latents that are not finite float arrays %s skipped", url, skipped, wanted)
    return rows


def _is_latent(data: bytes, shape: tuple[int, ...] | None = None) -> bool:
    """A .npy holding a finite [C, H, W] float array, of `shape` if given (no pickles: np.load refuses them by
    default)."""
    try:
        array = np.load(io.BytesIO(data))
    except (ValueError, OSError, EOFError):
        return False
    return (array.ndim == 3 and (shape is None or array.shape == tuple(shape)) and array.dtype.kind == "f"
            and bool(np.isfinite(array).all()))


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class DiffusionStream(ImageCaptionStream):
    """Micro-batches `(x [B, ...], captions)` of one rank: latents from latent shards, or pixels in [-1, 1]
    from image shards (`image_size` set). Split, shuffle and resumable position are the CLIP stream's; each
    caption is dropped (made empty) with probability `caption_dropout`, drawn from (seed, epoch, key), so a
    resumed stream drops the same ones."""

    def __init__(self, shards: ShardSet, *, latents: bool, image_size: int, caption_dropout: float,
                 latent_shape: tuple[int, int, int] | None = None, **kwargs: Any):
        super().__init__(shards, None, image_size=image_size, max_text_len=0, augment=False, **kwargs)
        self.latents, self.caption_dropout = latents, caption_dropout
        self.read = functools.partial(read_latent_tar, shape=latent_shape) if latents else read_image_tar

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "latents": self.latents, "caption_dropout": self.caption_dropout}

    def _batch(self, rows: list[Any]) -> tuple[Any, list[str]]:
        import torch

        arrays, captions = [], []
        for cursor, key, data, caption in rows:
            arrays.append(np.load(io.BytesIO(data)).astype(np.float32) if self.latents
                          else image_pixels(data, self.image_size))
            drop = np.random.default_rng([self.seed, cursor.epoch, _key_seed(key), 1]).random() < self.caption_dropout
            captions.append("" if drop else caption)
        return torch.from_numpy(np.stack(arrays)), captions


DiffusionLoader = BatchLoader  # a `DiffusionStream`'s batches in a loader process (the mechanism is the CLIP stream's)


# -- the driver -----------------------------------------------------------------------------------

def pretrain_diffusion(config: DiffusionPretrainConfig) -> PretrainResult:
    """Train (or continue) a text-conditioned latent diffusion model; export it as a diffusers pipeline folder
    and register it (champion on held-out FD-CLIP)."""
    return drive(config, Pretraining(
        "pretrain-diffusion", "diffusion model", "`pipelines encode` (latents) or `pipelines crawl images`",
        diffusion_train_loop, _prepare_frozen, export_diffusion,
        lambda m: {k: float(v) for k, v in m.items() if k.startswith("heldout_") and v is not None},
        FD_METRIC, "held-out FD-CLIP", register_diffusion, "no held-out samples to score",
        shards_kind=("latents", "images"), check=_check, lower_is_better=True))


def _manifest_autoencoder(shards: ShardSet) -> dict[str, Any]:
    return shards.manifest.get("autoencoder") or {}


def _check(config: DiffusionPretrainConfig, shards: ShardSet) -> None:
    """What can be refused before any worker starts."""
    from pipelines.train.registry import resolve_version

    for kind, source in (("clip", config.conditioning.text_encoder), ("autoencoder", config.conditioning.autoencoder)):
        if source and source.startswith("models:/"):
            _check_registered(kind, source)
        elif source and not Path(source, "config.json").is_file():
            raise PipelineError(f"{source}: not a registered model (models:/NAME@ALIAS) nor a model folder")
    if config.engine.zero_stage == 3:
        raise PipelineError("engine.zero_stage 3 is not supported for diffusion (the EMA needs whole parameters "
                            "on every rank); use 0-2")
    kind = shards.manifest.get("kind")
    encoded_with = _manifest_autoencoder(shards)
    if kind != "latents" and config.conditioning.autoencoder is None:
        raise PipelineError(f"{shards.url}: {kind or 'unknown'} shards, not latents: encode them first with "
                            "`pipelines encode`, or give --autoencoder to encode every batch on the fly")
    if kind == "latents" and config.conditioning.autoencoder and encoded_with.get("version") is not None:
        name, version = resolve_version(config.conditioning.autoencoder)
        if (name, version) != (encoded_with.get("name"), int(encoded_with["version"])):
            raise PipelineError(f"{shards.url} was encoded with models:/{encoded_with.get('name')}/"
                                f"{encoded_with['version']}, not {config.conditioning.autoencoder} "
                                f"(models:/{name}/{version}); the latents only decode with their own autoencoder")
    channels = encoded_with.get("latent_channels")
    if config.model.latent_channels and channels and config.model.latent_channels != channels:
        raise PipelineError(f"model.latent_channels {config.model.latent_channels} does not match the "
                            f"autoencoder's {channels} latent channels ({shards.url})")


def _check_registered(kind: str, uri: str) -> None:
    """That `uri` names a version of a registered model of `kind` (nothing downloaded)."""
    from mlflow.tracking import MlflowClient

    from pipelines.train.registry import KIND_LABELS, configure_tracking, resolve_version

    configure_tracking()
    name, version = resolve_version(uri)
    found = MlflowClient().get_model_version(name, str(version)).tags.get("pipelines.kind")
    if found != kind:
        raise PipelineError(f"{uri}: version {version} of {name} is {KIND_LABELS.get(found or '', 'a language model')}, "
                            f"not {KIND_LABELS[kind]}")


def _prepare_frozen(config: DiffusionPretrainConfig, shards: ShardSet, run_dir: str, console: Console) -> str:
    """The run's frozen models, copied into `{run_dir}/frozen`: the CLIP (`clip/`) and the autoencoder
    (`autoencoder/`) at their exact versions, named in `sources.json`. Every later step reads these."""
    from pipelines.train.registry import registered_folder, resolve_version

    def fetch(kind: str, source: str, into: str) -> dict[str, Any]:
        if source.startswith("models:/"):
            name, version = resolve_version(source)
            folder = registered_folder(kind, f"models:/{name}/{version}", into)
            return {"uri": f"models:/{name}/{version}", "name": name, "version": version, "given": source,
                    "folder": folder}
        if not Path(source, "config.json").is_file():
            raise PipelineError(f"{source}: not a registered model (models:/NAME@ALIAS) nor a model folder")
        _copy_tree(source, into)
        return {"uri": str(Path(source).absolute()), "given": source, "folder": into}

    encoded_with = _manifest_autoencoder(shards)
    autoencoder = config.conditioning.autoencoder or (
        f"models:/{encoded_with['name']}/{encoded_with['version']}" if encoded_with.get("name") else None)
    if autoencoder is None:
        raise PipelineError(f"{shards.url}: its manifest names no autoencoder; give --autoencoder")
    target = f"{run_dir}/frozen"
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"clip": fetch("clip", config.conditioning.text_encoder, f"{tmp}/clip"),
                   "autoencoder": fetch("autoencoder", autoencoder, f"{tmp}/autoencoder")}
        for part in sources.values():
            folder = part.pop("folder")
            if Path(folder).resolve() != Path(tmp, Path(folder).name).resolve():  # downloaded elsewhere
                _copy_tree(folder, f"{tmp}/{Path(folder).name}")
        from diffusers import AutoencoderKL

        vae_config = AutoencoderKL.load_config(f"{tmp}/autoencoder")
        channels = vae_config["latent_channels"]
        if config.model.latent_channels and config.model.latent_channels != channels:
            raise PipelineError(f"model.latent_channels {config.model.latent_channels} does not match the "
                                f"autoencoder's {channels} ({autoencoder})")
        Path(tmp, SOURCES_FILE).write_text(json.dumps(sources, indent=2))
        fs, path = filesystem(target)
        fs.makedirs(path, exist_ok=True)
        fs.put(tmp + "/", path, recursive=True)
    console.print(f"frozen: text encoder {sources['clip']['uri']}, autoencoder {sources['autoencoder']['uri']}")
    return target


def _copy_tree(source: str, target: str) -> None:
    import shutil

    shutil.copytree(source, target, dirs_exist_ok=True)


# -- the workers ----------------------------------------------------------------------------------

def diffusion_loss(pred: Any, target: Any, timesteps: Any, alphas_cumprod: Any, objective: ObjectiveConfig) -> Any:
    """Mean squared error per sample, weighted by min-SNR-γ: min(SNR, γ)/SNR for ε-prediction and
    min(SNR, γ)/(SNR + 1) for v-prediction (Hang et al. 2023, as diffusers' `--snr_gamma` does)."""
    import torch

    mse = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))
    if objective.snr_gamma > 0:
        alpha = alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alpha / (1 - alpha)
        clipped = torch.clamp(snr, max=objective.snr_gamma)
        mse = mse * (clipped / snr if objective.prediction == "epsilon" else clipped / (snr + 1))
    return mse.mean()


def step_generator(seed: int, rank: int, step: int, micro: int) -> Any:
    """The generator of one micro-batch's noise and noise levels: the same after a resume."""
    import torch

    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(
        f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest(), "big") % 2**63)


def diffusion_train_loop(args: dict[str, Any]) -> None:
    """One Ray Train worker: the whole loop, top to bottom."""
    import ray.train
    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKL

    config = DiffusionPretrainConfig.model_validate(args["config"])
    e, o, d, obj = config.engine, config.optim, config.data, config.objective
    rank, world, device, bf16 = worker_context(e, args["threads"])

    quiet_progress()
    with local_copy(args["tokenizer_dir"]) as frozen:
        text_encoder, tokenizer = load_text_encoder(f"{frozen}/clip")
        vae = AutoencoderKL.from_pretrained(f"{frozen}/autoencoder").eval().requires_grad_(False)
        eval_clip = _load_eval_clip(f"{frozen}/clip") if rank == 0 else None
    text_encoder.to(device)
    vae.to(device)
    shards = open_shards(args["shards"])
    latents_given = shards.manifest.get("kind") == "latents"
    channels, size = latent_dims(shards) if latents_given else latent_shape(vae.config)
    if channels != vae.config.latent_channels:
        raise PipelineError(f"{shards.url}: latents of {channels} channels; the autoencoder makes "
                            f"{vae.config.latent_channels}")
    scaling = vae.config.scaling_factor
    unet = build_unet(config.model, channels, size, text_encoder.config.hidden_size, e.seed)
    decay = [p for p in unet.parameters() if p.ndim >= 2]
    no_decay = [p for p in unet.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps, o.min_lr_ratio))
    engine, update = start_engine(unet, optimizer, schedule, config, bf16, world)
    ema = Ema(engine.module, obj.ema_decay, obj.ema_warmup)
    noise = noise_schedule(obj)

    stream = DiffusionStream(shards, latents=latents_given, image_size=vae.config.sample_size,
                             latent_shape=(channels, size, size), caption_dropout=obj.caption_dropout, micro_batch=e.micro_batch, rank=rank,
                             world_size=world, seed=e.seed, shuffle_buffer=d.shuffle_buffer,
                             heldout_percent=d.heldout_percent)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as c:
            engine.load_checkpoint(c, tag=DS_TAG)
            step = json.loads(Path(c, "state.json").read_text())["step"]
            stream.load_state_dict(json.loads(Path(c, f"data-rank{rank}.json").read_text()))
            ema.load(str(Path(c, EMA_FILE)))

    metrics_log = MetricsLog(args) if rank == 0 else None
    if metrics_log and checkpoint:
        metrics_log.add(step, {"restored_from_step": step})
        metrics_log.flush()
    evaluation = Evaluation(config, shards, text_encoder, tokenizer, vae, eval_clip) if rank == 0 else None
    samples_per_step = world * e.micro_batch * e.grad_accum
    batches = stream_batches(stream, int(d.loader_process))
    engine.train()
    dtype = torch.bfloat16 if bf16 else torch.float32
    stop_at = min(e.max_steps, e.stop_after or e.max_steps)
    while step < stop_at:
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for micro in range(e.grad_accum):
            x, captions = next(batches)
            generator = step_generator(e.seed, rank, step, micro)
            x = x.to(device)
            if latents_given:
                latents = x
            else:
                with torch.no_grad():
                    latents = vae.encode(x).latent_dist.sample(generator=generator) * scaling
            eps = torch.randn(latents.shape, generator=generator).to(device)
            if obj.noise_offset:
                eps = eps + obj.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(device)
            timesteps = torch.randint(0, obj.train_timesteps, (latents.shape[0],), generator=generator).to(device)
            noisy = noise.add_noise(latents, eps, timesteps)
            target = eps if obj.prediction == "epsilon" else noise.get_velocity(latents, eps, timesteps)
            states = encode_text(text_encoder, tokenizer, captions, device)
            pred = engine(noisy.to(dtype), timesteps, encoder_hidden_states=states.to(dtype)).sample
            loss = diffusion_loss(pred, target, timesteps, noise.alphas_cumprod, obj)
            update(loss)
            total += loss.detach().float()
        step += 1
        failpoint(f"diffusion-step-{step}")  # how the tests plant a failure (or a kill) inside a run
        if obj.ema_decay > 0:
            ema.update(engine.module, step)
        if world > 1:
            dist.all_reduce(total)
        loss_value = total.item() / (e.grad_accum * world)
        seconds = time.perf_counter() - started
        if metrics_log:
            metrics_log.add(step, {"loss": loss_value, "lr": schedule.get_last_lr()[0],
                                   "samples_per_s": samples_per_step / seconds, "step_s": seconds})
        last = step == stop_at
        scored: dict[str, float] = {}
        if (last and step == e.max_steps) or (config.sampling.eval_every and step % config.sampling.eval_every == 0):
            if evaluation:
                scored = evaluation.run(ema if obj.ema_decay > 0 else None, engine.module, step, args)
                metrics_log.add(step, scored)
            if world > 1:
                dist.barrier()  # the other ranks wait for rank 0's evaluation
        if step % e.checkpoint_every == 0 or last:
            report = {"step": step, "loss": loss_value, "stopped": last and step < e.max_steps, **scored}
            if metrics_log:
                metrics_log.flush()
            save_checkpoint(engine, stream, rank, step, report,
                            extra=lambda folder: ema_or_weights(ema, engine.module, obj).save(f"{folder}/{EMA_FILE}"))
    if metrics_log:
        metrics_log.close()


def ema_or_weights(ema: Ema, module: Any, objective: ObjectiveConfig) -> Ema:
    """What the export uses: the EMA, or without one (ema_decay 0) the weights themselves."""
    if objective.ema_decay > 0:
        return ema
    return Ema(module, 0.0, False)


def _load_eval_clip(folder: str) -> Any:
    from pipelines.train.clip_model import load_clip

    return load_clip(folder, device="cpu")


class Evaluation:
    """Rank 0's held-out evaluation: images for held-out captions from the EMA weights, scored with the CLIP."""

    def __init__(self, config: DiffusionPretrainConfig, shards: ShardSet, text_encoder: Any, tokenizer: Any,
                 vae: Any, clip: Any):
        self.config, self.text_encoder, self.tokenizer, self.vae, self.clip = config, text_encoder, tokenizer, vae, clip
        self.real, self.captions = heldout_images(shards, config.data.heldout_percent, config.sampling.eval_samples,
                                                  vae)

    def run(self, ema: Ema | None, module: Any, step: int, args: dict[str, Any]) -> dict[str, float]:
        from mlflow.tracking import MlflowClient

        from pipelines.train.image_eval import clip_scores, fd_clip, grid

        if len(self.captions) < 2:
            return {}
        unet = build_unet(self.config.model, module.config.in_channels, module.config.sample_size,
                          module.config.cross_attention_dim)
        unet.load_state_dict(ema.shadow if ema is not None else {k: v.float() for k, v in module.state_dict().items()})
        pipe = make_pipeline(unet.to(self.vae.device), self.vae, self.text_encoder, self.tokenizer,
                             self.config.objective)
        s = self.config.sampling
        images = generate(pipe, self.captions, s.sample_steps, s.guidance_scale, s.sample_seed)
        metrics = {FD_METRIC: fd_clip(self.clip, self.real, images),
                   "heldout_clip_score": float(clip_scores(self.clip, images, self.captions).mean()),
                   "heldout_clip_score_real": float(clip_scores(self.clip, self.real, self.captions).mean()),
                   "heldout_samples": float(len(images))}
        MlflowClient(tracking_uri=args["tracking_uri"]).log_image(
            args["mlflow_run_id"], grid(images[:16]), artifact_file=f"samples/step-{step:07d}.png")
        return metrics


def heldout_images(shards: ShardSet, heldout_percent: float, limit: int, vae: Any) -> tuple[list[Any], list[str]]:
    """Up to `limit` held-out real images (PIL) and their captions: from image shards; for latent shards from
    the image shards they were encoded from (the same keys are held out), or, when those cannot be read,
    the held-out latents decoded."""
    from PIL import Image

    source = shards
    if shards.manifest.get("kind") == "latents":
        origin = shards.manifest.get("input") or {}
        url = origin.get("path") or origin.get("url")
        try:
            source = open_shards(url) if url else None
        except Exception as exc:  # noqa: BLE001 - any storage failure: fall back to the latents
            log.warning("%s: source images unreadable (%s); scoring against decoded held-out latents", url, exc)
            source = None
    if source is not None:
        pairs = heldout_pairs(source, heldout_percent, limit)
        return [Image.open(io.BytesIO(data)).convert("RGB") for _, data, _ in pairs], [c for *_, c in pairs]
    import torch

    channels, side = latent_dims(shards)
    latents, captions = [], []
    for url in shards.tars:
        for key, data, caption in read_latent_tar(url, (channels, side, side)):
            if is_heldout(key, heldout_percent):
                latents.append(np.load(io.BytesIO(data)).astype(np.float32))
                captions.append(caption)
        if len(latents) >= limit:
            break
    if not latents:
        return [], []
    with torch.no_grad():
        x = torch.from_numpy(np.stack(latents[:limit])).to(vae.device) / vae.config.scaling_factor
        decoded = vae.decode(x).sample
    return [to_pil(image) for image in decoded], captions[:limit]


def to_pil(image: Any) -> Any:
    """A [3, H, W] tensor in [-1, 1] as a PIL image."""
    from PIL import Image

    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def make_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, objective: ObjectiveConfig) -> Any:
    """diffusers' StableDiffusionPipeline of these parts, with the DPM-Solver++ sampler on the training's noise
    levels and no safety checker (there is none to download)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=noise_schedule(objective, sampler=True), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, captions: list[str], steps: int, guidance: float, seed: int, batch: int = 16) -> list[Any]:
    """One image per caption; image i from seed `seed + i`, whatever the batch."""
    import torch

    images = []
    for start in range(0, len(captions), batch):
        part = captions[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(part))]
        with torch.no_grad():
            images += pipe(part, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def quiet_progress() -> None:
    """No progress bars from diffusers' and transformers' loading and saving (they are not our progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


# -- export and registry --------------------------------------------------------------------------

def export_diffusion(checkpoint_dir: str, frozen_dir: str, model_dir: str, config: DiffusionPretrainConfig) -> None:
    """The last checkpoint's EMA weights with the frozen autoencoder and text encoder, as a diffusers pipeline
    folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) and `sources.json`."""
    from diffusers import AutoencoderKL

    quiet_progress()
    with local_copy(frozen_dir) as frozen, tempfile.TemporaryDirectory() as out:
        text_encoder, tokenizer = load_text_encoder(f"{frozen}/clip")
        vae = AutoencoderKL.from_pretrained(f"{frozen}/autoencoder")
        channels, size = latent_shape(vae.config)
        unet = build_unet(config.model, channels, size, text_encoder.config.hidden_size)
        from safetensors.torch import load_file

        missing, unexpected = unet.load_state_dict(load_file(str(Path(checkpoint_dir, EMA_FILE))), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {checkpoint_dir} does not fit the denoiser: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        make_pipeline(unet, vae, text_encoder, tokenizer, config.objective).save_pretrained(out)
        Path(out, SOURCES_FILE).write_text(Path(frozen, SOURCES_FILE).read_text())
        fs, path = filesystem(model_dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(out + "/", path, recursive=True)


def register_diffusion(model_dir: str, name: str, *, run_id: str, metric: str, value: float,
                       lower_is_better: bool = True, lineage: dict[str, Any] | None = None) -> Any:
    """Register a diffusion pipeline folder; its lineage names the text encoder's and autoencoder's versions
    besides the shards'."""
    from pipelines.train.registry import register_folder

    sources = json.loads(Path(model_dir, SOURCES_FILE).read_text())
    lineage = {**(lineage or {}), "text_encoder": sources["clip"]["uri"], "autoencoder": sources["autoencoder"]["uri"]}
    return register_folder("diffusion", model_dir, name, run_id=run_id, metric=metric, value=value,
                           lower_is_better=lower_is_better, lineage=lineage)


def load_diffusion(source: str, device: str | None = None) -> Any:
    """The diffusers pipeline of a registered diffusion model (models:/NAME@ALIAS or /VERSION) or a folder."""
    import torch
    from diffusers import DiffusionPipeline

    quiet_progress()
    folder = source
    if source.startswith("models:/"):
        from pipelines.train.registry import registered_folder

        folder = registered_folder("diffusion", source)
    if not Path(folder, "model_index.json").is_file():
        raise PipelineError(f"{source}: not a diffusion model folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
