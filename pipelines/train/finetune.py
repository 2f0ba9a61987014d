"""`pipelines finetune`: LoRA fine-tuning of a registered (or local) causal LM on instruction data,
on the same Ray Train + DeepSpeed engine, checkpoints and resume as pretraining.

The driver resolves the base (`models:/NAME@ALIAS` pinned to its version, or a local Hugging Face
folder), turns a jsonl of examples into shards, opens the MLflow run (the examples' shards as its
input, the pinned base as a param) and starts the workers. Each worker wraps the base with peft
(frozen base, trainable LoRA matrices only in the optimizer), measures the held-out loss before
training, trains on the assistant tokens only, and measures it again. The driver turns the last
checkpoint into the adapter folder (and optionally a merged model) and registers it, its version
pinned to the base version it was trained on.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pipelines.errors import PipelineError
from pipelines.runtime import filesystem, settings
from pipelines.shards import absolute, is_local
from pipelines.train.finetune_config import ExamplesConfig, FinetuneConfig, FinetuneRegistry, LoraSettings  # noqa: F401
from pipelines.train.pretrain import (DS_TAG, RUN_FILE, MetricsLog, fit, init_train_ray, local_copy, lr_lambda,
                                      resolve_run, resources, save_checkpoint, start_engine, storage_root,
                                      worker_context, write_json, zero_label)

# LoRA targets by model type when the config names none: the attention projections (the LoRA
# paper's choice), which peft's own defaults also pick for these architectures.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
}


@dataclass
class FinetuneResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str
    base: str  # the pinned base: models:/NAME/VERSION, or the local folder
    steps: int
    stopped: bool
    metrics: dict[str, Any]
    adapter_dir: str | None = None
    merged_dir: str | None = None
    registered: Any = None  # registry.Registered of the adapter
    registered_merged: Any = None


# -- the driver -----------------------------------------------------------------------------------

def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a LoRA adapter on the base as the config says; export and register it at the end."""
    from pipelines.train import registry
    from pipelines.train.sft import prepare_examples

    console = Console(quiet=config.quiet, stderr=True, soft_wrap=True)
    storage = storage_root(config.storage)
    fs, _ = filesystem(storage)
    config, run_name, saved = resolve_run(config, storage, fs)
    run_dir = f"{storage}/{run_name}"
    if not config.base:
        raise PipelineError("no base model: give --base models:/NAME@ALIAS (or a local Hugging Face folder)")
    from pipelines.train.diffusion_lora import finetune_diffusion, is_diffusion_base

    if is_diffusion_base(saved["base"] if saved else config.base):  # a LoRA on its denoiser, from images
        return finetune_diffusion(config, run_name, saved)
    if not config.examples.data:
        raise PipelineError("no examples: give --data (a jsonl of prompt/response or messages rows, or shards)")

    registry.configure_tracking()
    base_uri, base_dir = (saved["base"], saved["base_dir"]) if saved else _resolve_base(config.base, storage)
    shards = prepare_examples(absolute(config.examples.data), storage)
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
        method = f"LoRA r={config.lora.rank}" if config.lora.method == "lora" else "full fine-tuning"
        console.print(f"[bold]finetune[/bold] {run_name}: {method} on {base_uri}, "
                      f"{config.engine.workers} worker(s) ({'GPU' if use_gpu else f'{cpus} CPU each'}), "
                      f"{zero_label(config.engine)}, {config.engine.max_steps} steps; MLflow run {mlflow_run_id}")
        result = fit(finetune_loop, {"config": params, "base_dir": base_dir, "shards": shards.url, "threads": cpus,
                                     "mlflow_run_id": mlflow_run_id, "tracking_uri": settings().mlflow_tracking_uri},
                     config.engine, run_name, storage, use_gpu, cpus)
        metrics = dict(result.metrics or {})
        step = int(metrics.get("step", 0))
        if metrics.get("stopped"):
            console.print(f"stopped after step {step}; continue with --resume {run_name}")
            return FinetuneResult(run_name, run_dir, mlflow_run_id, base_uri, step, True, metrics)

        full = config.lora.method == "full"
        adapter_dir = None if full else f"{run_dir}/adapter"
        merged_dir = f"{run_dir}/merged" if config.lora.merge or full else None
        with result.checkpoint.as_directory() as checkpoint_dir:
            if full:
                export_full(checkpoint_dir, base_dir, merged_dir, config)
            else:
                export_adapter(checkpoint_dir, base_dir, adapter_dir, merged_dir, config)
        final = {k: float(metrics[k]) for k in ("heldout_loss_before", "heldout_loss") if metrics.get(k) is not None}
        registry.log_metrics(final, step=step)
        out = FinetuneResult(run_name, run_dir, mlflow_run_id, base_uri, step, False, metrics, adapter_dir, merged_dir)
        if config.registry.register_model:
            if "heldout_loss" not in final:
                raise PipelineError("no held-out examples to measure the loss on: raise --heldout-percent, "
                                    "or pass --no-register-model")
            lineage = {"examples": shards.url, "examples_digest": shards.digest, "run_dir": run_dir}
            if adapter_dir:
                with local_copy(adapter_dir) as local_adapter:
                    out.registered = registry.register_adapter(
                        local_adapter, config.registry.model_name, run_id=mlflow_run_id, base_uri=base_uri,
                        metric="heldout_loss", value=final["heldout_loss"], lineage=lineage)
            if merged_dir:
                with local_copy(merged_dir) as local_merged:
                    out.registered_merged = registry.register_model(
                        local_merged, config.registry.model_name + ("" if full else "-merged"), run_id=mlflow_run_id,
                        metric="heldout_loss", value=final["heldout_loss"], lineage=lineage,
                        extra_tags={registry.BASE_MODEL_TAG: base_uri})
        console.print(f"done: {step} steps, held-out loss {final.get('heldout_loss_before', math.nan):.4f} -> "
                      f"{final.get('heldout_loss', math.nan):.4f}; {adapter_dir or merged_dir}"
                      + "".join(f"; registered {r.uri}{' (champion)' if r.champion else ''}"
                                for r in (out.registered, out.registered_merged) if r))
        return out


def _resolve_base(base: str, storage: str) -> tuple[str, str]:
    """(the pinned base, the folder workers load it from): a registered version is copied once into
    `{storage}/bases/NAME/VERSION`, where later runs on the same version find it."""
    from pipelines.train import registry

    if base.startswith("models:/"):
        name, version = registry.resolve_version(base)
        pinned = f"models:/{name}/{version}"
        target = f"{storage}/bases/{name}/{version}"
        fs, path = filesystem(target)
        if fs.exists(f"{path}/config.json"):
            return pinned, target
        model, tokenizer = registry.load_registered(pinned)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            # config.json last: a half-copied base is never found
            if is_local(fs):
                staged = f"{path}.tmp-{os.getpid()}"
                fs.makedirs(staged, exist_ok=True)
                fs.put(tmp + "/", staged, recursive=True)
                if fs.exists(path):
                    fs.rm(path, recursive=True)
                fs.mv(staged, path, recursive=True)
            else:  # an object store has no rename (mv copies, in any order): upload in place
                for name in sorted(os.listdir(tmp), key=lambda name: name == "config.json"):
                    fs.put(os.path.join(tmp, name), f"{path}/{name}", recursive=True)
        return pinned, target
    folder = absolute(base)
    if is_local(filesystem(folder)[0]) and not Path(folder, "config.json").is_file():
        raise PipelineError(f"{base}: neither a registered model (models:/NAME@ALIAS) nor a Hugging Face folder")
    return folder, folder


def lora_config(settings_: LoraSettings, model_type: str) -> Any:
    from peft import LoraConfig, TaskType

    targets = settings_.target_modules or DEFAULT_TARGETS.get(model_type) or "all-linear"
    return LoraConfig(r=settings_.rank, lora_alpha=settings_.alpha, lora_dropout=settings_.lora_dropout,
                      target_modules=targets, task_type=TaskType.CAUSAL_LM)


def load_base(base_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from pipelines.train.tokenizer import load_tokenizer

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    return model, load_tokenizer(base_dir)


# -- the workers ----------------------------------------------------------------------------------

def finetune_loop(args: dict[str, Any]) -> None:
    """One Ray Train worker: peft on the base, DeepSpeed, the loop, held-out loss before and after."""
    import ray.train
    import torch
    import torch.distributed as dist
    from peft import get_peft_model

    from pipelines.train.data import make_loader, open_shards
    from pipelines.train.sft import ExampleStream

    config = FinetuneConfig.model_validate(args["config"])
    e, o = config.engine, config.optim
    rank, world, device, bf16 = worker_context(e, args["threads"])

    with local_copy(args["base_dir"]) as base_dir:
        base, _ = load_base(base_dir)
        torch.manual_seed(e.seed)  # the LoRA matrices' init
        lora = config.lora.method == "lora"
        model = get_peft_model(base, lora_config(config.lora, base.config.model_type)) if lora else base
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8,
                                      weight_decay=o.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps,
                                                                          o.min_lr_ratio))
        engine, update = start_engine(model, optimizer, schedule, config, bf16, world)
        shards = open_shards(args["shards"])
        stream = ExampleStream(shards, base_dir, seq_len=config.examples.seq_len, micro_batch=e.micro_batch,
                               rank=rank, world_size=world, seed=e.seed, shuffle_buffer=config.examples.shuffle_buffer,
                               heldout_percent=config.examples.heldout_percent,
                               num_workers=config.examples.loader_workers)
        step, before = 0, None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
                state = json.loads(Path(d, "state.json").read_text())
                step, before = state["step"], state.get("heldout_loss_before")
                stream.load_state_dict(json.loads(Path(d, f"data-rank{rank}.json").read_text()))
        else:
            before = evaluate_examples(engine, config, shards, base_dir, rank, world, device)

        metrics_log = MetricsLog(args) if rank == 0 else None
        if metrics_log:
            metrics_log.add(step, {"peak_rss_before_training_mb": peak_rss_mb()})
        if metrics_log and checkpoint:
            metrics_log.add(step, {"restored_from_step": step})
            metrics_log.flush()
        batches = iter(make_loader(stream))
        engine.train()
        stop_at = min(e.max_steps, e.stop_after or e.max_steps)
        while step < stop_at:
            started = time.perf_counter()
            total = torch.zeros(2, device=device)  # loss sum, trained tokens
            for _ in range(e.grad_accum):
                batch = next(batches).to(device, non_blocking=True)
                ids, labels = batch[:, 0], batch[:, 1]
                loss = engine(input_ids=ids, labels=labels).loss
                update(loss)
                total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
            step += 1
            if world > 1:
                dist.all_reduce(total)
            loss_value = (total[0] / total[1]).item()
            seconds = time.perf_counter() - started
            tokens = world * e.micro_batch * e.grad_accum * config.examples.seq_len
            if metrics_log:
                metrics_log.add(step, {"loss": loss_value, "lr": schedule.get_last_lr()[0],
                                       "tokens_per_s": tokens / seconds, "step_s": seconds})
            last = step == stop_at
            if step % e.checkpoint_every == 0 or last:
                report = {"step": step, "loss": loss_value, "stopped": last and step < e.max_steps,
                          "heldout_loss_before": before}
                if last and step == e.max_steps:
                    report["heldout_loss"] = evaluate_examples(engine, config, shards, base_dir, rank, world, device)
                    engine.train()
                if metrics_log:
                    metrics_log.flush()
                if last:
                    report["peak_rss_mb"] = peak_rss_mb()
                save_checkpoint(engine, stream, rank, step, report, {"heldout_loss_before": before},
                                exclude_frozen=lora)
        if metrics_log:
            metrics_log.add(step, {"peak_rss_mb": peak_rss_mb(),
                                   "trainable_parameters": sum(p.numel() for p in trainable)})
            metrics_log.close()


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): what a worker's model, optimizer and activations took."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_examples(engine: Any, config: FinetuneConfig, shards: Any, tokenizer_dir: str, rank: int, world: int,
                      device: Any) -> float | None:
    """Mean loss on the held-out examples' assistant tokens, over all ranks (same forwards on each)."""
    import torch
    import torch.distributed as dist

    from pipelines.train.sft import IGNORE, heldout_examples

    e = config.engine
    rows = heldout_examples(shards, tokenizer_dir, seq_len=config.examples.seq_len,
                            max_examples=e.eval_batches * e.micro_batch,
                            heldout_percent=config.examples.heldout_percent)
    mine = rows[rank::world]
    batches = [torch.from_numpy(np.stack(mine[i:i + e.micro_batch]))
               for i in range(0, len(mine), e.micro_batch)]
    n = torch.tensor([len(batches)], device=device)
    if world > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for i in range(int(n.item())):
            real = i < len(batches)
            batch = (batches[i] if real else torch.from_numpy(rows[0][None])).to(device)
            loss = engine(input_ids=batch[:, 0], labels=batch[:, 1]).loss
            if real:
                tokens = int((batch[:, 1, 1:] != IGNORE).sum())
                sums += torch.tensor([loss.double().item() * tokens, tokens], device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item() if sums[1] > 0 else None


# -- export ---------------------------------------------------------------------------------------

def checkpoint_state(checkpoint_dir: str, exclude_frozen: bool) -> dict[str, Any]:
    """The weights of a DeepSpeed checkpoint (any ZeRO stage), in fp32."""
    import torch

    chosen = "DS_ACCELERATOR" in os.environ
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # see export_model in pretrain.py
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    finally:
        if not chosen:
            os.environ.pop("DS_ACCELERATOR", None)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if not any(Path(checkpoint_dir, DS_TAG).glob("zero_pp_rank_*")):  # saved without ZeRO
            state = torch.load(Path(checkpoint_dir, DS_TAG, "mp_rank_00_model_states.pt"), map_location="cpu",
                               weights_only=False)["module"]
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG,
                                                             exclude_frozen_parameters=exclude_frozen)
    return {k: v.float() for k, v in state.items()}


def export_full(checkpoint_dir: str, base_dir: str, model_dir: str, config: FinetuneConfig) -> None:
    """A fully fine-tuned model (every weight trained) from the last checkpoint, as a Hugging Face folder."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    state = checkpoint_state(checkpoint_dir, exclude_frozen=False)
    with local_copy(base_dir) as local_base:
        model, tokenizer = load_base(local_base)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {checkpoint_dir}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        model.tie_weights()
        _put_folder(model_dir, model, tokenizer)


def _put_folder(target: str, model: Any, tokenizer: Any) -> None:
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        fs, path = filesystem(target)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(out + "/", path, recursive=True)


def export_adapter(checkpoint_dir: str, base_dir: str, adapter_dir: str, merged_dir: str | None,
                   config: FinetuneConfig) -> None:
    """The adapter folder (peft's adapter_config.json + adapter_model.safetensors) from the last
    checkpoint, and with `merged_dir` the base with the adapter merged in (a plain HF model)."""
    from peft import get_peft_model
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    state = {k: v for k, v in checkpoint_state(checkpoint_dir, exclude_frozen=True).items()
             if "lora_" in k}
    with local_copy(base_dir) as local_base:
        base, tokenizer = load_base(local_base)
        model = get_peft_model(base, lora_config(config.lora, base.config.model_type))
        expected = {k for k in model.state_dict() if "lora_" in k}
        if set(state) != expected:
            raise RuntimeError(f"checkpoint {checkpoint_dir}: LoRA weights {sorted(set(state) ^ expected)[:4]} "
                               "missing or unexpected")
        model.load_state_dict(state, strict=False)
        _put_folder(adapter_dir, model, tokenizer)  # peft saves the adapter only
        if merged_dir:
            _put_folder(merged_dir, model.merge_and_unload(), tokenizer)
