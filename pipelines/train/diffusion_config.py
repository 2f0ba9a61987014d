"""The settings of `pipelines pretrain --kind diffusion` (the run is `pipelines.train.diffusion`). Kept apart from
the run, which imports torch and diffusers, so that the CLI builds its options and answers `--help` without them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config import ConfigModel
from pipelines.train.config import PRETRAIN_KIND, EngineConfig, OptimConfig, RegistryConfig, TrainRunConfig


class DiffusionModelConfig(ConfigModel):
    preset: Literal["tiny", "small", "sd"] = Field("tiny", description=(
        "Denoiser (UNet) size: tiny (CPU tests), small, or sd (Stable Diffusion 1.x's UNet)."))
    latent_channels: int | None = Field(None, gt=0, description=(
        "Channels of the latents; must match the autoencoder's (default: the autoencoder's)."))


class ConditioningConfig(ConfigModel):
    text_encoder: str = Field("models:/clip-tiny@champion", description=(
        "The registered CLIP (models:/NAME@ALIAS or /VERSION) whose text tower conditions the denoiser, frozen; "
        "it also scores the samples (FD-CLIP, CLIP score)."))
    autoencoder: str | None = Field(None, description=(
        "The registered autoencoder (models:/NAME@ALIAS or /VERSION); default: the one the latent shards were "
        "encoded with. Required to train on image shards (each batch is then encoded on the fly)."))


class ObjectiveConfig(ConfigModel):
    prediction: Literal["epsilon", "v_prediction"] = Field("epsilon", description=(
        "What the denoiser predicts: epsilon (the noise, Stable Diffusion 1) or v_prediction (SD 2)."))
    snr_gamma: float = Field(5.0, ge=0, description="Min-SNR-γ loss weighting (5 recommended; 0: plain MSE).")
    caption_dropout: float = Field(0.1, ge=0, lt=1, description=(
        "Share of training captions replaced by the empty caption (what classifier-free guidance needs)."))
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (0: off).")
    train_timesteps: int = Field(1000, gt=1, description="DDPM noise levels.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the weights' moving average (0: no EMA).")
    ema_warmup: bool = Field(True, description=(
        "Decay min(ema_decay, (1+step)/(10+step)), so early averages are not dominated by the initial weights."))


class SamplingConfig(ConfigModel):
    eval_every: int = Field(0, ge=0, description="Generate and score held-out samples every this many steps "
                                                 "(0: at the end only).")
    eval_samples: int = Field(32, ge=2, description="Held-out captions generated for FD-CLIP and the CLIP score.")
    sample_steps: int = Field(20, gt=0, description="Sampler steps (DPM-Solver++).")
    guidance_scale: float = Field(4.0, ge=1, description="Classifier-free guidance scale (1: none).")
    sample_seed: int = Field(0, description="Seed of the evaluation samples (the same images every evaluation).")


class DiffusionDataConfig(ConfigModel):
    shards: str | None = Field(None, description=(
        "Latent shards (`pipelines encode` output), or image shards (`pipelines crawl images`/`curate`) encoded "
        "on the fly: folder or fsspec URL."))
    shuffle_buffer: int = Field(256, gt=0, description="Samples shuffled together.")
    heldout_percent: float = Field(5.0, ge=0, lt=100, description=(
        "Share of samples (by key hash) held out for the evaluation."))
    loader_process: bool = Field(False, description=(
        "Read and decode batches in a loader process, ahead of the training step (default: in the training "
        "thread, which costs ~2.5% of a small CPU step; a loader process costs memory and a core's share)."))


class DiffusionPretrainConfig(TrainRunConfig):
    kind: Literal["diffusion"] = Field("diffusion", description=PRETRAIN_KIND)
    model: DiffusionModelConfig = DiffusionModelConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    sampling: SamplingConfig = SamplingConfig()
    data: DiffusionDataConfig = DiffusionDataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-4, weight_decay=0.01, warmup_steps=50, min_lr_ratio=1.0, beta2=0.999)
    engine: EngineConfig = EngineConfig(micro_batch=32)
    registry: RegistryConfig = RegistryConfig(experiment="pretrain-diffusion", model_name="diffusion-tiny")
