"""The settings of `pipelines pretrain --kind clip` (the run is `pipelines.train.clip`, the model
`pipelines.train.clip_model`). Kept apart from the run, which imports torch, so that the CLI builds its options
and answers `--help` without it."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from pipelines.config import ConfigModel
from pipelines.train.config import (PRETRAIN_KIND, EngineConfig, OptimConfig, RegistryConfig, TokenizerConfig,
                                     TrainRunConfig)


class ClipModelConfig(ConfigModel):
    """The shape of a CLIP-style model."""

    preset: Literal["tiny", "small", "base"] = Field("tiny", description="Tower sizes: tiny, small or base.")
    image_size: int = Field(64, ge=16, description="Square input images, in pixels.")
    patch_size: int = Field(8, ge=2, description="Vision transformer patch size.")
    max_text_len: int = Field(32, ge=4, description="Tokens per caption (longer ones are cut).")


class ClipDataConfig(ConfigModel):
    shards: str | None = Field(None, description=(
        "Image shards (`pipelines crawl images`/`pipelines curate` output): folder or fsspec URL."))
    shuffle_buffer: int = Field(256, gt=0, description="Image-caption pairs shuffled together.")
    heldout_percent: float = Field(5.0, ge=0, lt=100, description=(
        "Share of pairs (by key hash) held out for the final recall."))
    augment: bool = Field(True, description="Random resized crop and horizontal flip of training images.")
    crop_scale: float = Field(0.6, gt=0, le=1, description="Smallest share of the image area a random crop keeps.")
    hflip: bool = Field(True, description="Flip half the training images left-right (off for captions that say "
                                          "left or right).")
    loader_workers: int = Field(0, ge=0, description=(
        "Loader processes per training worker that read, decode, crop and tokenize the next batches while the "
        "step computes, the same batches in the same order with the same resume position (0: in the training "
        "thread; on 2 CPU cores 1 or 2 were 5-11% slower over a run, as they take the cores the step computes on)."))


class ClipPretrainConfig(TrainRunConfig):
    # the loader processes make the same batches in the same order however many there are: a resume may change them
    resumable: ClassVar[set[tuple[str, ...]]] = TrainRunConfig.resumable | {("data", "loader_workers")}

    kind: Literal["clip"] = Field("clip", description=PRETRAIN_KIND)
    model: ClipModelConfig = ClipModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig(vocab_size=4096)
    data: ClipDataConfig = ClipDataConfig()
    optim: OptimConfig = OptimConfig(lr=5e-4, weight_decay=0.2, beta2=0.98)
    engine: EngineConfig = EngineConfig(micro_batch=64)
    registry: RegistryConfig = RegistryConfig(experiment="pretrain-clip", model_name="clip-tiny")
