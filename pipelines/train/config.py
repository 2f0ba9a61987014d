"""The pretraining config: a YAML file (`configs/pretrain/*.yaml`) whose every field is also a
command-line option of `pipelines pretrain` (`--max-steps`, `--zero-stage`, ...)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from pipelines.config import ConfigModel

class ModelConfig(ConfigModel):
    preset: Literal["tiny", "small", "125m", "350m", "1b"] = Field("tiny", description=(
        "Llama-style size: tiny (trains in a minute on a laptop CPU), small, 125m, 350m, 1b."))
    hidden_size: int | None = Field(None, gt=0, description="Override the preset's hidden size.")
    num_layers: int | None = Field(None, gt=0, description="Override the preset's number of layers.")
    num_heads: int | None = Field(None, gt=0, description="Override the preset's attention heads.")
    num_kv_heads: int | None = Field(None, gt=0, description="Override the preset's key/value heads (GQA).")
    intermediate_size: int | None = Field(None, gt=0, description="Override the preset's MLP width.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")


class TokenizerConfig(ConfigModel):
    tokenizer: str | None = Field(None, description=(
        "A local tokenizer folder to use; unset: train a byte-level BPE on the training shards."))
    vocab_size: int = Field(8192, ge=300, description="Vocabulary of the trained tokenizer.")
    tokenizer_samples: int = Field(50_000, gt=0, description="Documents the tokenizer is trained on (at most).")


class DataConfig(ConfigModel):
    shards: str | None = Field(None, description=(
        "Text shards (`pipelines crawl`/`pipelines curate` output): folder or fsspec URL."))
    seq_len: int = Field(256, ge=8, description="Tokens per packed training sequence.")
    shuffle_buffer: int = Field(256, gt=0, description="Sequences shuffled together.")
    heldout_percent: float = Field(2.0, ge=0, lt=100, description=(
        "Share of documents (by key hash) held out for the final perplexity."))
    loader_workers: int = Field(0, ge=0, description="Dataloader worker processes per training worker.")


class OptimConfig(ConfigModel):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps, then cosine decay to max-steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms and biases).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW's beta1: decay of the gradients' moving average.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW's beta2: decay of the squared gradients' moving average.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")


class EngineConfig(ConfigModel):
    workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on GPU machines).")
    use_gpu: bool | None = Field(None, description="Train on GPUs (default: when the cluster has any).")
    cpus_per_worker: int | None = Field(None, gt=0, description=(
        "CPUs (and torch threads) per worker; default on CPU: the cluster's CPUs shared out, else 1."))
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    micro_batch: int = Field(8, gt=0, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    max_steps: int = Field(200, gt=0, description="Optimizer steps in the whole run.")
    seed: int = Field(1234, description="Seed of the model init, data order and shuffling.")
    log_every: int = Field(1, gt=0, description="Log metrics to MLflow every this many steps.")
    eval_batches: int = Field(16, ge=0, description=(
        "Held-out micro-batches (over all workers) for the final perplexity."))
    checkpoint_every: int = Field(50, gt=0, description="Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept in storage.")
    max_failures: int = Field(2, ge=-1, description="Worker failures to recover from (-1: no limit).")
    stop_after: int | None = Field(None, gt=0, description=(
        "Stop after this step with a checkpoint, as if interrupted (continue with --resume)."))


class RegistryConfig(ConfigModel):
    experiment: str = Field("pretrain", description="MLflow experiment.")
    model_name: str = Field("lm-tiny", description="Registered model name in MLflow.")
    register_model: bool = Field(True, description="Register the exported model (alias candidate; champion if better).")


class TrainRunConfig(ConfigModel):
    """What every training job (pretrain, finetune) has: where its run lives, and how to continue one."""

    storage: str | None = Field(None, description=(
        "Where runs keep checkpoints and exports: folder or fsspec URL (default $PIPELINES_HOME/train)."))
    run_name: str | None = Field(None, description="Name of the run in storage (default: generated).")
    resume: str | None = Field(None, description="Continue the stopped run of this name from its last checkpoint.")
    quiet: bool = Field(False, description="No progress output.")

    # What a run is called and how it shows progress do not change what it trains (see ConfigModel.digest).
    run_options: ClassVar[dict[str, Any]] = {"run_name": True, "resume": True, "quiet": True}

    # Options that may differ when a stopped run is resumed (everything else comes from the run).
    resumable: ClassVar[set[tuple[str, ...]]] = {
        ("engine", "max_failures"), ("engine", "stop_after"), ("engine", "checkpoint_every"),
        ("engine", "log_every"), ("registry", "register_model"), ("quiet",)}


PRETRAIN_KIND = ("What `pipelines pretrain` trains: lm, a causal language model on text shards; clip, a CLIP-style "
                 "image-text model on caption-image shards; autoencoder, a KL autoencoder (the latent-diffusion "
                 "first stage) on image shards; or diffusion, a text-to-image latent diffusion model on latent shards.")


class PretrainConfig(TrainRunConfig):
    kind: Literal["lm"] = Field("lm", description=PRETRAIN_KIND)
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    engine: EngineConfig = EngineConfig()
    registry: RegistryConfig = RegistryConfig()
