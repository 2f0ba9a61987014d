"""`pipelines pretrain --kind autoencoder`: a KL autoencoder (diffusers' `AutoencoderKL`) trained against a patch
discriminator on Ray Train + DeepSpeed, from the image shards of `pipelines crawl images` (`KEY.jpg/.webp/.png`;
captions are not needed). It is the first stage of latent diffusion: `pipelines encode` turns image shards into
its latents, and `pipelines pretrain --kind diffusion` learns to generate them.

The recipe is latent diffusion's (`LPIPSWithDiscriminator` of CompVis' code, Rombach et al. 2022) without the
perceptual term, whose LPIPS weights would have to be downloaded: an L1 + weighted MSE reconstruction loss of
the decoded posterior sample, a KL term towards N(0, I) with a tiny weight, and, after `disc_start` steps, a
pix2pix patch discriminator with the hinge loss. The generator's adversarial term is weighted adaptively:
||grad rec_loss|| / ||grad g_loss|| at the decoder's last layer (clamped, detached) x `disc_weight`, so the
discriminator never outweighs reconstruction whatever their scales. The losses are per pixel: latent diffusion's
objective divided by the pixels of an image (the same optimum; readable numbers, and gradient clipping that
means the same at any image size).

Two DeepSpeed engines train side by side on every worker, the autoencoder's and the discriminator's, each with
its own optimizer; both go in every checkpoint (DeepSpeed tags `ds` and `disc`), so a resume continues exactly.
At the end rank 0 reconstructs the held-out images: PSNR (what `champion` moves on), L1, optionally FD-CLIP,
and the standard deviation of their latents, whose inverse becomes the exported model's `scaling_factor` (how
Stable Diffusion's 0.18215 was found), so the diffusion stage's latents have unit variance.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console

from pipelines.errors import PipelineError
from pipelines.runtime import failpoint, filesystem
from pipelines.shards import IMAGE_EXTS, TAR_ERRORS, image_of, read_tar
from pipelines.train.clip import ImageCaptionStream, PairCursor
from pipelines.train.autoencoder_config import (AUTOENCODER_PRESETS, AutoencoderDataConfig, AutoencoderEvalConfig,
                                                AutoencoderLossConfig, AutoencoderModelConfig,
                                                AutoencoderPretrainConfig)
from pipelines.train.data import EMPTY_EPOCHS, ShardSet, is_heldout, training_samples
from pipelines.train.pretrain import (DS_TAG, MetricsLog, Pretraining, PretrainResult, checkpoint_state, drive,
                                      local_copy, lr_lambda, start_engine, worker_context)

log = logging.getLogger(__name__)

PSNR_METRIC = "heldout_psnr"
DISC_TAG = "disc"  # the discriminator's DeepSpeed tag in a checkpoint (the autoencoder's is DS_TAG)
# Adam's betas of the discriminator: latent diffusion's GAN betas, whatever `optim` says. Only the discriminator
# has them: on the autoencoder, beta1 0.5 and beta2 0.9 cost the tiny preset 9 dB of held-out PSNR after 800
# steps (27.0 against 36.1 dB with 0.9 and 0.99).
DISC_BETAS = (0.5, 0.9)

# -- models ---------------------------------------------------------------------------------------

def build_autoencoder(config: AutoencoderModelConfig, seed: int = 0) -> Any:
    """A freshly initialised diffusers `AutoencoderKL` of `config`'s preset."""
    from diffusers import AutoencoderKL

    from diffusers.models.resnet import ResnetBlock2D

    blocks, layers, groups, attention = AUTOENCODER_PRESETS[config.preset]
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                        layers_per_block=layers, latent_channels=config.latent_channels or 4,
                        norm_num_groups=groups, sample_size=config.image_size, mid_block_add_attention=attention)
    # Every residual branch starts at zero (its last convolution), so each block starts as the identity (Goyal
    # et al. 2017): the colours pass through the untrained network instead of being scrambled by it. Measured on
    # the tiny preset: +1.2 dB of held-out PSNR after 800 steps, the slow start of training much shorter.
    for block in vae.modules():
        if isinstance(block, ResnetBlock2D):
            torch.nn.init.zeros_(block.conv2.weight)
            torch.nn.init.zeros_(block.conv2.bias)
    return vae


def downsample_factor(config: AutoencoderModelConfig) -> int:
    """How many pixels of a side one latent stands for."""
    return 2 ** (len(AUTOENCODER_PRESETS[config.preset][0]) - 1)


class KLAutoencoder(torch.nn.Module):
    """The autoencoder as DeepSpeed trains it: one forward that returns the reconstruction of a posterior sample
    (drawn from `generator`, so a resumed run draws the same noise) and the posterior, which the KL term needs."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior


class PatchDiscriminator(torch.nn.Module):
    """pix2pix's PatchGAN (`NLayerDiscriminator`, Isola et al. 2017), as latent diffusion uses it: strided 4x4
    convolutions with batch norm and leaky ReLUs, ending in one real-or-fake logit per overlapping patch."""

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        blocks: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            wider = channels * min(2 ** n, 8)
            blocks += [torch.nn.Conv2d(width, wider, 4, 2 if n < layers else 1, 1, bias=False),
                       torch.nn.BatchNorm2d(wider), torch.nn.LeakyReLU(0.2)]
            width = wider
        blocks.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
        self.net = torch.nn.Sequential(*blocks)
        for module in self.modules():  # pix2pix's initialisation
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.normal_(module.weight, 1.0, 0.02)
                torch.nn.init.zeros_(module.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: real patches pushed above +1, reconstructed ones below -1."""
    return 0.5 * (torch.relu(1.0 - logits_real.float()).mean() + torch.relu(1.0 + logits_fake.float()).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Latent diffusion's balance of the adversarial term: the ratio of the gradient norms the reconstruction
    and the adversarial loss send to the decoder's last layer, clamped to [0, 1e4] and detached."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()


# -- data -----------------------------------------------------------------------------------------

def read_images(url: str) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, "") of every sample of an image shard tar that has an image (in any format the crawl
    writes; a caption is not needed), in tar order; a tar that cannot be read counts as empty, with a warning."""
    try:
        samples = read_tar(url, IMAGE_EXTS)
    except TAR_ERRORS as exc:
        log.warning("%s: cannot read, skipped (%s: %s)", url, type(exc).__name__, exc)
        return []
    return [(key, image[1], "") for key, s in samples.items() if (image := image_of(s)) is not None]


def heldout_images(shards: ShardSet, heldout_percent: float, limit: int) -> list[bytes]:
    """The first `limit` held-out images, in shard order; the same on every call."""
    images: list[bytes] = []
    for url in shards.tars:
        images += [data for key, data, _ in read_images(url) if is_heldout(key, heldout_percent)]
        if len(images) >= limit:
            break
    return images[:limit]


def image_pixels(data: bytes, size: int, flip: bool = False) -> np.ndarray:
    """An encoded image as a `[3, size, size]` float32 array in [-1, 1]: shorter side resized to `size`
    (bicubic), centre crop, mirrored left-right if `flip`. The one view of an image every image-generation
    stage takes (autoencoder training, `pipelines encode`, diffusion on image shards), so latents computed on
    the fly and precomputed ones never drift apart."""
    from PIL import Image

    return square_pixels(Image.open(io.BytesIO(data)), size, flip)


def square_pixels(image: Any, size: int, flip: bool = False) -> np.ndarray:
    """`image_pixels` of an opened PIL image."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return (np.asarray(image, np.float32) / 127.5 - 1).transpose(2, 0, 1).copy()


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ImageStream(ImageCaptionStream):
    """Infinite, deterministic, resumable micro-batches `[B, 3, S, S]` of one rank's training images, pixels in
    [-1, 1]. Split, shuffle and position are the CLIP stream's (`state_dict` / `load_state_dict` too); each image
    is flipped or not by (seed, epoch, key), so a resumed stream flips the same ones."""

    read = staticmethod(read_images)

    def __init__(self, shards: ShardSet, *, image_size: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, heldout_percent: float, hflip: bool = True):
        super().__init__(shards, None, image_size=image_size, max_text_len=0, micro_batch=micro_batch, rank=rank,
                         world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                         heldout_percent=heldout_percent, augment=False, hflip=hflip)

    def _batch(self, rows: list[tuple[PairCursor, str, bytes, str]]) -> torch.Tensor:
        arrays = []
        for cursor, key, data, _ in rows:
            flip = self.hflip and np.random.default_rng([self.seed, cursor.epoch, _key_seed(key)]).random() < 0.5
            arrays.append(image_pixels(data, self.image_size, flip))
        return torch.from_numpy(np.stack(arrays))

    def _pairs(self, start: PairCursor) -> Iterator[tuple[PairCursor, str, bytes, str]]:
        walk = training_samples(
            self.shards, self.seed, self.rank, self.world_size, self.heldout_percent, self.read,
            (start.epoch, start.tar, start.sample, start.index),
            f"{self.shards.url}: rank {self.rank} of {self.world_size} found no training image in {EMPTY_EPOCHS} "
            "epochs (no samples with an image, all held out, or unreadable tars)")
        for epoch, t, k, index, (key, data, caption) in walk:
            yield PairCursor(epoch, t, k, index), key, data, caption


# -- the driver -----------------------------------------------------------------------------------

def pretrain_autoencoder(config: AutoencoderPretrainConfig) -> PretrainResult:
    """Train (or continue) a KL autoencoder against a patch discriminator; export it as a diffusers AutoencoderKL
    folder with its scaling factor and register it (champion on held-out reconstruction PSNR)."""
    return drive(config, Pretraining(
        "pretrain-autoencoder", "autoencoder", "`pipelines crawl images` or `pipelines curate`",
        autoencoder_train_loop, _prepare_eval_clip, export_autoencoder,
        lambda m: {k: float(v) for k, v in m.items()
                   if (k.startswith("heldout_") or k in ("latent_std", "scaling_factor")) and v is not None},
        PSNR_METRIC, "held-out PSNR (dB)", register_autoencoder, "no held-out images to reconstruct",
        shards_kind="images", check=_check, lower_is_better=False))


def _check(config: AutoencoderPretrainConfig, shards: ShardSet) -> None:
    """What can be refused before any worker starts."""
    factor = downsample_factor(config.model)
    if config.model.image_size % factor:
        raise PipelineError(f"model.image_size {config.model.image_size} is not a multiple of the "
                            f"{config.model.preset} autoencoder's downsampling factor {factor}")
    if config.engine.zero_stage == 3:
        raise PipelineError("engine.zero_stage 3 is not supported for the autoencoder (the adaptive weight needs "
                            "the decoder's whole last layer on every rank); use 0-2")
    clip = config.evaluation.eval_clip
    if clip and clip.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        from pipelines.train.registry import KIND_LABELS, configure_tracking, resolve_version

        configure_tracking()
        name, version = resolve_version(clip)
        found = MlflowClient().get_model_version(name, str(version)).tags.get("pipelines.kind")
        if found != "clip":
            raise PipelineError(f"{clip}: version {version} of {name} is "
                                f"{KIND_LABELS.get(found or '', 'a language model')}, not a CLIP model")
    elif clip and not Path(clip, "config.json").is_file():
        raise PipelineError(f"evaluation.eval_clip {clip}: not a registered model (models:/NAME@ALIAS) nor a "
                            "CLIP folder")


def _prepare_eval_clip(config: AutoencoderPretrainConfig, shards: ShardSet, run_dir: str, console: Console) -> str:
    """The CLIP that scores the reconstructions, copied into `{run_dir}/eval-clip` (a resume uses that same
    copy); "" without one."""
    clip = config.evaluation.eval_clip
    if not clip:
        return ""
    target = f"{run_dir}/eval-clip"
    with tempfile.TemporaryDirectory() as tmp:
        folder = clip
        if clip.startswith("models:/"):
            from pipelines.train.registry import clip_folder

            folder = clip_folder(clip, tmp)
        fs, path = filesystem(target)
        fs.makedirs(path, exist_ok=True)
        fs.put(folder.rstrip("/") + "/", path, recursive=True)
    console.print(f"FD-CLIP of the reconstructions with {clip}")
    return target


# -- the workers ----------------------------------------------------------------------------------

def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The posterior noise of one micro-batch, from (seed, rank, step, micro): the same after a resume."""
    return torch.Generator().manual_seed(_key_seed(f"{seed}/{rank}/{step}/{micro}") % 2**63)


def autoencoder_train_loop(args: dict[str, Any]) -> None:
    """One Ray Train worker: the whole loop, top to bottom."""
    import ray.train
    import torch.distributed as dist

    from pipelines.train.data import open_shards

    config = AutoencoderPretrainConfig.model_validate(args["config"])
    e, o, lo, d = config.engine, config.optim, config.loss, config.data
    rank, world, device, bf16 = worker_context(e, args["threads"])
    dtype = torch.bfloat16 if bf16 else torch.float32

    model = KLAutoencoder(build_autoencoder(config.model, e.seed))
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.ndim >= 2],
                                    "weight_decay": o.weight_decay},
                                   {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps, o.min_lr_ratio))
    engine, update = start_engine(model, optimizer, schedule, config, bf16, world)

    torch.manual_seed(e.seed + 1)
    disc = PatchDiscriminator(lo.disc_layers, lo.disc_channels)
    d_optimizer = torch.optim.AdamW(disc.parameters(), lr=o.lr, betas=DISC_BETAS, eps=1e-8, weight_decay=0.0)
    d_schedule = torch.optim.lr_scheduler.LambdaLR(  # its own steps start at disc_start
        d_optimizer, lr_lambda(o.warmup_steps, max(1, e.max_steps - lo.disc_start), o.min_lr_ratio))
    d_engine, d_update = start_engine(disc, d_optimizer, d_schedule, config, bf16, world)

    shards = open_shards(args["shards"])
    stream = ImageStream(shards, image_size=config.model.image_size, micro_batch=e.micro_batch, rank=rank,
                         world_size=world, seed=e.seed, shuffle_buffer=d.shuffle_buffer,
                         heldout_percent=d.heldout_percent, hflip=d.hflip)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as c:
            engine.load_checkpoint(c, tag=DS_TAG)
            d_engine.load_checkpoint(c, tag=DISC_TAG)
            step = json.loads(Path(c, "state.json").read_text())["step"]
            stream.load_state_dict(json.loads(Path(c, f"data-rank{rank}.json").read_text()))

    clip = None
    if args["tokenizer_dir"] and rank == 0:  # the CLIP of FD-CLIP (`_prepare_eval_clip`)
        from pipelines.train.clip_model import load_clip

        with local_copy(args["tokenizer_dir"]) as folder:
            clip = load_clip(folder, device=str(device))

    metrics_log = MetricsLog(args) if rank == 0 else None
    if metrics_log and checkpoint:  # a restart after a failure, or a resumed run
        metrics_log.add(step, {"restored_from_step": step})
        metrics_log.flush()
    pixels_per_image = 3 * config.model.image_size ** 2
    last_layer = engine.module.vae.decoder.conv_out.weight
    names = ["loss", "rec_loss", "kl_loss", "g_loss", "adaptive_weight", "d_loss", "logits_real", "logits_fake"]
    batches = iter(stream)
    engine.train()
    d_engine.train()
    stop_at = min(e.max_steps, e.stop_after or e.max_steps)
    while step < stop_at:
        started = time.perf_counter()
        gan = step >= lo.disc_start and lo.disc_weight > 0
        sums = torch.zeros(len(names), device=device, dtype=torch.float64)
        for micro in range(e.grad_accum):
            pixels = next(batches).to(device, dtype, non_blocking=True)
            # The module itself, not the engine's forward: DeepSpeed hooks the engine's outputs to refuse any
            # backward but its own, and the adaptive weight takes two gradients of its own (below ZeRO-3 the
            # engine's forward adds nothing else).
            reconstruction, posterior = engine.module(pixels, step_generator(e.seed, rank, step, micro))
            error = (reconstruction.float() - pixels.float())
            rec_loss = error.abs().mean() + lo.mse_weight * error.pow(2).mean()
            kl_loss = posterior.kl().float().mean()  # summed over the latent, averaged over the batch
            loss = rec_loss + lo.kl_weight * kl_loss / pixels_per_image
            g_loss = weight = torch.zeros((), device=device)
            if gan:
                disc.requires_grad_(False)  # the adversarial term trains the autoencoder, not the discriminator
                g_loss = -d_engine.module(reconstruction).float().mean()  # (the module: its engine does not backward)
                weight = adaptive_weight(rec_loss, g_loss, last_layer) * lo.disc_weight
                loss = loss + weight * g_loss
            update(loss)
            values = [loss, rec_loss, kl_loss, g_loss, weight]
            if gan:
                disc.requires_grad_(True)
                logits_real, logits_fake = d_engine(pixels), d_engine(reconstruction.detach())
                d_loss = hinge_loss(logits_real, logits_fake)
                d_update(d_loss)
                values += [d_loss, logits_real.float().mean(), logits_fake.float().mean()]
            sums[:len(values)] += torch.stack([v.detach().double() for v in values])
        step += 1
        failpoint(f"pretrain-step-{step}")
        if world > 1:
            dist.all_reduce(sums)
        means = (sums / (e.grad_accum * world)).tolist()
        seconds = time.perf_counter() - started
        if metrics_log:
            logged = dict(zip(names[:len(names) if gan else 3], means))
            metrics_log.add(step, {**logged, "lr": schedule.get_last_lr()[0], "step_s": seconds,
                                   "samples_per_s": world * e.micro_batch * e.grad_accum / seconds})
        last = step == stop_at
        if step % e.checkpoint_every == 0 or last:
            report: dict[str, Any] = {"step": step, "loss": means[0], "stopped": last and step < e.max_steps}
            if last and step == e.max_steps and rank == 0:  # parameters are whole on every rank below ZeRO-3
                images = heldout_images(shards, d.heldout_percent, e.eval_batches * e.micro_batch)
                report.update(evaluate_reconstruction(engine.module.vae, images, config.model.image_size, clip))
                engine.train()
            if metrics_log:
                metrics_log.flush()
            if world > 1:
                dist.barrier()  # the other ranks wait for rank 0's evaluation
            save_both(engine, d_engine, stream, rank, step, report,
                      {"latent_std": report["latent_std"]} if "latent_std" in report else {})
    if metrics_log:
        metrics_log.close()


def save_both(engine: Any, d_engine: Any, stream: Any, rank: int, step: int, metrics: dict[str, Any],
              state: dict[str, Any]) -> None:
    """A checkpoint of both engines (DeepSpeed tags `ds` and `disc`, from every rank), each rank's data
    position and rank 0's `state.json`; reported with `metrics`. Ray Train merges the ranks' folders."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        for tag, eng in ((DS_TAG, engine), (DISC_TAG, d_engine)):
            os.makedirs(f"{d}/{tag}", exist_ok=True)
            eng.save_checkpoint(d, tag=tag)
        Path(d, f"data-rank{rank}.json").write_text(json.dumps(stream.state_dict()))
        if rank == 0:
            Path(d, "state.json").write_text(json.dumps({"step": step, **state}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step-{step:07d}")


def evaluate_reconstruction(vae: Any, images: list[bytes], image_size: int, clip: Any = None,
                            batch: int = 32) -> dict[str, float]:
    """Reconstructions of `images` from their posterior means: PSNR (dB, on [0, 1] pixels) and mean absolute
    error (on [-1, 1] pixels, as rec_loss) against the originals, the standard deviation of the latents, and
    with a CLIP (`ClipBundle`) the FD-CLIP between originals and reconstructions."""
    from pipelines.train.image_eval import psnr

    if not images:
        return {}
    vae.eval()
    parameter = next(vae.parameters())
    originals, reconstructions, latents = [], [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.stack([image_pixels(data, image_size) for data in images[start:start + batch]]))
            mean = vae.encode(x.to(parameter.device, parameter.dtype)).latent_dist.mean
            originals.append(x)
            reconstructions.append(vae.decode(mean).sample.float().clamp(-1, 1).cpu())
            latents.append(mean.float().cpu())
    x, y, z = torch.cat(originals), torch.cat(reconstructions), torch.cat(latents)
    latent_std = z.std().item()
    metrics = {PSNR_METRIC: psnr(((x + 1) / 2).numpy(), ((y + 1) / 2).numpy()),
               "heldout_l1": (x - y).abs().mean().item(), "heldout_images": float(len(images)),
               "latent_std": latent_std, "scaling_factor": 1.0 / latent_std}
    if clip is not None and len(images) >= 2:
        from pipelines.train.image_eval import fd_clip

        metrics["heldout_fd_clip"] = fd_clip(clip, [to_pil(image) for image in x], [to_pil(image) for image in y])
    return metrics


def to_pil(image: torch.Tensor) -> Any:
    """A [3, H, W] tensor in [-1, 1] as a PIL image."""
    from PIL import Image

    return Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


# -- export and registry --------------------------------------------------------------------------

def export_autoencoder(checkpoint_dir: str, _clip_dir: str, model_dir: str, config: AutoencoderPretrainConfig) -> None:
    """The last checkpoint's autoencoder (not the discriminator) as a diffusers `AutoencoderKL` folder, its
    `scaling_factor` 1 / the held-out latents' standard deviation, as `AutoencoderKL.from_pretrained` loads it."""
    vae = build_autoencoder(config.model)
    state = {k.removeprefix("vae."): v.float() for k, v in checkpoint_state(checkpoint_dir).items()}
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint_dir} does not fit the autoencoder: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    latent_std = json.loads(Path(checkpoint_dir, "state.json").read_text()).get("latent_std")
    if latent_std and math.isfinite(latent_std) and latent_std > 0:
        vae.register_to_config(scaling_factor=1.0 / latent_std)
    with tempfile.TemporaryDirectory() as out:
        vae.eval().save_pretrained(out)
        fs, path = filesystem(model_dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(out + "/", path, recursive=True)


def register_autoencoder(model_dir: str, name: str, *, run_id: str, metric: str, value: float,
                         lower_is_better: bool = False, lineage: dict[str, Any] | None = None) -> Any:
    """Register an autoencoder folder (higher PSNR is better by default), tagged with what the next stages need
    to know of it: latent channels, downsampling factor, image size and scaling factor."""
    from pipelines.train.registry import register_folder

    c = json.loads(Path(model_dir, "config.json").read_text())
    tags = {"latent_channels": c["latent_channels"], "downsample_factor": 2 ** (len(c["block_out_channels"]) - 1),
            "image_size": c["sample_size"], "scaling_factor": c["scaling_factor"]}
    return register_folder("autoencoder", model_dir, name, run_id=run_id, metric=metric, value=value,
                           lower_is_better=lower_is_better, lineage=lineage, extra_tags=tags)
