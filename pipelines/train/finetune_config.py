"""The settings of `pipelines finetune` (the run is `pipelines.train.finetune`). Kept apart from the run, which
imports torch, so that the CLI builds its options and answers `--help` without it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.config import ConfigModel
from pipelines.train.config import EngineConfig, OptimConfig, TrainRunConfig


class LoraSettings(ConfigModel):
    method: Literal["lora", "full"] = Field("lora", description=(
        "lora: train LoRA matrices on the frozen base; full: train every weight (registered as a full model)."))
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA input (it keeps a copy of each adapted layer's input for the backward pass)."))
    target_modules: list[str] | None = Field(None, description=(
        "Module names to adapt (default: the attention projections of the base's architecture)."))
    merge: bool = Field(False, description="Also export and register the base with the adapter merged in.")


class ExamplesConfig(ConfigModel):
    data: str | None = Field(None, description=(
        "Examples. For a language model: a jsonl of {prompt, response} or {messages} rows, or shards made from "
        "one. For a diffusion model: a folder of captioned images (NAME.jpg + NAME.txt, or diffusers' "
        "metadata.jsonl), or image shards."))
    seq_len: int = Field(256, ge=8, description="Tokens per example (longer ones are cut).")
    shuffle_buffer: int = Field(64, gt=0, description="Examples shuffled together.")
    heldout_percent: float = Field(10.0, ge=0, lt=100, description="Share of examples held out for the loss.")
    loader_workers: int = Field(0, ge=0, description="Dataloader worker processes per training worker.")


class FinetuneRegistry(ConfigModel):
    experiment: str = Field("finetune", description="MLflow experiment.")
    model_name: str = Field("lm-tiny-lora", description="Registered name of the adapter (merged: NAME-merged).")
    register_model: bool = Field(True, description="Register the adapter (alias candidate; champion if better).")


class FinetuneConfig(TrainRunConfig):
    base: str | None = Field(None, description=(
        "Base model: models:/NAME@ALIAS, models:/NAME/VERSION or a local folder."))
    lora: LoraSettings = LoraSettings()
    examples: ExamplesConfig = ExamplesConfig()
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0)
    engine: EngineConfig = EngineConfig(max_steps=100, checkpoint_every=25, zero_stage=0, eval_batches=8)
    registry: FinetuneRegistry = FinetuneRegistry()
