"""The settings of `pipelines pretrain --kind autoencoder` (the run is `pipelines.train.autoencoder`). Kept apart
from the run, which imports torch, so that the CLI builds its options and answers `--help` without it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config import ConfigModel
from pipelines.train.config import PRETRAIN_KIND, EngineConfig, OptimConfig, RegistryConfig, TrainRunConfig

# Autoencoder shapes by preset: (block_out_channels, layers_per_block, norm_num_groups, mid-block attention).
# The downsampling factor is 2 ** (blocks - 1). `sd` is Stable Diffusion's f8 autoencoder (84M parameters).
# `tiny` leaves out the mid-block attention: without it the small model learns several times faster on a CPU.
AUTOENCODER_PRESETS: dict[str, tuple[tuple[int, ...], int, int, bool]] = {
    "tiny": ((64, 64), 1, 16, False),
    "small": ((64, 128, 256), 2, 32, True),
    "sd": ((128, 256, 512, 512), 2, 32, True),
}


# -- config ---------------------------------------------------------------------------------------

class AutoencoderModelConfig(ConfigModel):
    preset: Literal["tiny", "small", "sd"] = Field("tiny", description=(
        "Autoencoder size: tiny (f2, CPU tests), small (f4), or sd (Stable Diffusion's f8 shape)."))
    image_size: int = Field(32, ge=8, description="Square input images, in pixels (a multiple of the downsampling "
                                                  "factor).")
    latent_channels: int | None = Field(None, gt=0, description="Channels of the latents (default: the preset's, 4).")


class AutoencoderLossConfig(ConfigModel):
    mse_weight: float = Field(20.0, ge=0, description=(
        "Weight of a squared-error term added to the L1 reconstruction (PSNR is squared error; L1 alone pulls "
        "every pixel equally hard, whatever its error, and learns the colours of flat regions slowly)."))
    kl_weight: float = Field(1e-6, ge=0, description=(
        "Weight of the KL term (summed over an image's latent) against the reconstruction summed over its "
        "pixels, as latent diffusion weighs it."))
    disc_start: int = Field(100, ge=0, description=(
        "Optimizer steps of reconstruction alone before the discriminator and the adversarial term start."))
    disc_weight: float = Field(0.5, ge=0, description="Scale of the adaptively weighted adversarial term (0: no GAN).")
    disc_layers: int = Field(3, ge=1, le=6, description="Strided conv layers of the patch discriminator.")
    disc_channels: int = Field(64, gt=0, description="Channels of the patch discriminator's first layer.")


class AutoencoderDataConfig(ConfigModel):
    shards: str | None = Field(None, description=(
        "Image shards (`pipelines crawl images`/`pipelines curate` output): folder or fsspec URL."))
    shuffle_buffer: int = Field(256, gt=0, description="Images shuffled together.")
    heldout_percent: float = Field(5.0, ge=0, lt=100, description=(
        "Share of images (by key hash) held out for the final reconstruction measures."))
    hflip: bool = Field(True, description="Flip half the training images left-right.")


class AutoencoderEvalConfig(ConfigModel):
    eval_clip: str | None = Field(None, description=(
        "A CLIP (models:/NAME@ALIAS or /VERSION, or a local folder): also measure FD-CLIP between the held-out "
        "images and their reconstructions."))


class AutoencoderPretrainConfig(TrainRunConfig):
    kind: Literal["autoencoder"] = Field("autoencoder", description=PRETRAIN_KIND)
    model: AutoencoderModelConfig = AutoencoderModelConfig()
    loss: AutoencoderLossConfig = AutoencoderLossConfig()
    data: AutoencoderDataConfig = AutoencoderDataConfig()
    evaluation: AutoencoderEvalConfig = AutoencoderEvalConfig()
    optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=20, beta1=0.5, beta2=0.9)
    engine: EngineConfig = EngineConfig(micro_batch=16)
    registry: RegistryConfig = RegistryConfig(experiment="pretrain-autoencoder", model_name="autoencoder-tiny")
