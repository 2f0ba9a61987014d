"""`pipelines pretrain`: DeepSpeed pretraining of a causal LM on Ray Train, from our text shards.

The driver (`pretrain`) checks the config and the shards, trains or loads the tokenizer, opens the
MLflow run with the shards as its input, and starts a `TorchTrainer`; every worker runs
`train_loop`: `deepspeed.initialize`, then a plain loop of micro-batches with checkpoints through
`ray.train.report`. When the workers finish, the driver consolidates the last checkpoint into a
Hugging Face model (safetensors + tokenizer) and registers it in MLflow.

Layout of a run in storage (`{storage}/{run name}/`): `run.json` (config, MLflow run id, shards
digest), `tokenizer/`, `step-NNNNNNN/` checkpoints (Ray Train's, one file set per ZeRO rank, plus
each rank's data position), `model/` (the export).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from pipelines.errors import InfrastructureError, PipelineError
from pipelines.runtime import cluster_cpus, failpoint, filesystem, init_ray, settings
from pipelines.shards import absolute, is_local, write_file
from pipelines.train.config import PretrainConfig

RUN_FILE = "run.json"
DS_TAG = "ds"


@dataclass
class PretrainResult:
    run_name: str
    run_dir: str
    mlflow_run_id: str
    steps: int
    stopped: bool  # stopped early (stop_after); continue with resume
    metrics: dict[str, Any]
    model_dir: str | None = None
    registered: Any = None  # registry.Registered


# -- the driver -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pretraining:
    """What pretraining one kind of model needs besides the common driver (`drive`): the language model's
    (`pretrain`) and CLIP's (`pipelines.train.clip.pretrain_clip`)."""

    stage: str  # the MLflow stage tag and the progress lines' name
    what: str  # "model", "CLIP": in the start line
    shards_from: str  # what writes the shards it trains on, for the error without them
    loop: Callable[[dict[str, Any]], None]  # the Ray Train worker
    # (config, shards, run_dir, console) -> the folder the workers get as `tokenizer_dir` (None: none)
    prepare_tokenizer: Callable[[Any, Any, str, Console], str] | None
    export: Callable[[str, str, str, Any], None]  # (checkpoint dir, tokenizer dir, model dir, config)
    final: Callable[[dict[str, Any]], dict[str, float]]  # the held-out figures among the last report's
    metric: str  # the one the registry compares, and its label
    metric_label: str
    register: Callable[..., Any]  # registry.register_model or register_clip
    no_metric: str  # why there is no metric to register on
    shards_kind: str | tuple[str, ...] | None = None  # the manifest kind(s) it trains on (None: any)
    check: Callable[[Any, Any], None] | None = None  # (config, shards): raise PipelineError before training
    lower_is_better: bool | None = None  # of `metric`, when `register` takes it (None: register's default)


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Train (or continue) a causal LM as the config says; export and register it at the end."""
    from pipelines.train import registry

    return drive(config, Pretraining(
        "pretrain", "model", "`pipelines crawl` or `pipelines curate`", train_loop, _prepare_tokenizer, export_model,
        lambda m: {k: float(m[k]) for k in ("heldout_loss", "heldout_perplexity") if m.get(k) is not None},
        "heldout_perplexity", "held-out perplexity", registry.register_model,
        "no held-out documents to measure perplexity on"))


def drive(config: Any, kind: Pretraining) -> PretrainResult:
    """The driver of a pretraining run of any kind: resolve (or resume) the run, train its tokenizer, open the
    MLflow run and train on Ray Train; then export the last checkpoint, log the held-out figures and register."""
    from pipelines.train import registry
    from pipelines.train.data import open_shards

    console = Console(quiet=config.quiet, stderr=True, soft_wrap=True)
    storage = storage_root(config.storage)
    fs, _ = filesystem(storage)
    given_shards = absolute(config.data.shards) if config.data.shards else None
    config, run_name, saved = resolve_run(config, storage, fs)
    run_dir = f"{storage}/{run_name}"
    if saved and given_shards and given_shards != config.data.shards:
        raise PipelineError(f"run {run_name} trains on {config.data.shards}, not {given_shards}")
    if not config.data.shards:
        raise PipelineError(f"no training shards: give --shards (a folder or URL written by {kind.shards_from})")
    config.data.shards = absolute(config.data.shards)  # the workers run in other folders, maybe machines
    shards = open_shards(config.data.shards)
    wanted = (kind.shards_kind,) if isinstance(kind.shards_kind, str) else kind.shards_kind
    if wanted and shards.manifest.get("kind") not in (None, *wanted):
        raise PipelineError(f"{config.data.shards}: {shards.manifest.get('kind')} shards; {kind.stage} trains on "
                            f"{' or '.join(wanted)} shards")
    if kind.check is not None:
        kind.check(config, shards)  # the kind's own checks of config and shards, before any worker starts
    init_train_ray()
    use_gpu, cpus = resources(config)

    prepare = kind.prepare_tokenizer
    tokenizer_dir = run_tokenizer(saved, shards, run_name,
                                  lambda: prepare(config, shards, run_dir, console) if prepare else "")

    registry.configure_tracking()
    params = config.model_dump(mode="json")
    with registry.training_run(config.registry.experiment, run_name, params,
                               tags={"pipelines.stage": kind.stage, "pipelines.run_dir": run_dir},
                               run_id=saved["mlflow_run_id"] if saved else None) as mlflow_run_id:
        record_run(fs, run_dir, saved, params, mlflow_run_id, shards, tokenizer_dir, config.engine.workers)
        console.print(f"[bold]{kind.stage}[/bold] {run_name}: {config.model.preset} {kind.what}, "
                      f"{config.engine.workers} worker(s) ({'GPU' if use_gpu else f'{cpus} CPU each'}), "
                      f"{zero_label(config.engine)}, {config.engine.max_steps} steps; MLflow run {mlflow_run_id}")
        result = fit(kind.loop, {"config": params, "tokenizer_dir": tokenizer_dir, "shards": shards.url,
                                 "threads": cpus, "mlflow_run_id": mlflow_run_id,
                                 "tracking_uri": settings().mlflow_tracking_uri},
                     config.engine, run_name, storage, use_gpu, cpus)
        metrics = dict(result.metrics or {})
        step = int(metrics.get("step", 0))
        if metrics.get("stopped"):
            console.print(f"stopped after step {step}; continue with --resume {run_name}")
            return PretrainResult(run_name, run_dir, mlflow_run_id, step, True, metrics)

        model_dir = f"{run_dir}/model"
        with result.checkpoint.as_directory() as checkpoint_dir:
            kind.export(checkpoint_dir, tokenizer_dir, model_dir, config)
        final = kind.final(metrics)
        registry.log_metrics(final, step=step)
        registered = None
        if config.registry.register_model:
            if kind.metric not in final:
                raise PipelineError(f"{kind.no_metric}: raise --heldout-percent or --eval-batches, or pass "
                                    "--no-register-model")
            with local_copy(model_dir) as local_model:
                order = {} if kind.lower_is_better is None else {"lower_is_better": kind.lower_is_better}
                registered = kind.register(local_model, config.registry.model_name, run_id=mlflow_run_id,
                                           metric=kind.metric, value=final[kind.metric],
                                           lineage=lineage(config.data.shards, shards.manifest, run_dir), **order)
        console.print(f"done: {step} steps, {kind.metric_label} {final.get(kind.metric, float('nan')):.3f}; "
                      f"model {model_dir}" + (f"; registered {registered.uri}"
                                              f"{' (champion)' if registered.champion else ''}" if registered else ""))
        return PretrainResult(run_name, run_dir, mlflow_run_id, step, False, metrics, model_dir, registered)


def run_tokenizer(saved: dict | None, shards: Any, run_name: str, prepare: Any) -> str:
    """The run's tokenizer: `prepare()`d for a new run; a resumed run's own, when its shards are unchanged."""
    if saved is None:
        return prepare()
    if saved["shards_digest"] != shards.digest:
        raise PipelineError(f"run {run_name} was trained on shards with digest {saved['shards_digest'][:12]}; "
                            f"{shards.url} now has {shards.digest[:12]}: start a new run instead")
    return saved["tokenizer_dir"]


def record_run(fs: Any, run_dir: str, saved: dict | None, params: dict[str, Any], mlflow_run_id: str, shards: Any,
               tokenizer_dir: str, workers: int) -> None:
    """The shards as the MLflow run's input (once), and the run's record that a resume reads."""
    from pipelines.train import registry

    if saved is None:
        registry.log_shards_input(shards.url, shards.manifest)
    write_json(fs, f"{run_dir}/{RUN_FILE}", {
        "config": params, "mlflow_run_id": mlflow_run_id, "shards_digest": shards.digest,
        "tokenizer_dir": tokenizer_dir, "workers": workers})


def lineage(url: str, manifest: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Where the model's data came from: the shards, and for curated shards the crawl they were curated from."""
    lineage = {"shards": url, "shards_digest": manifest["digest"], "run_dir": run_dir}
    source = manifest.get("input") or {}
    if source.get("digest"):
        lineage.update(source_shards=source.get("path") or source.get("url") or "", source_digest=source["digest"])
    return lineage


def resolve_run(config: Any, storage: str, fs: Any) -> tuple[Any, str, dict | None]:
    """The run's name, and for --resume the saved run with its config (plus the options a resume may change)."""
    if config.resume:
        path = f"{storage}/{config.resume}/{RUN_FILE}"
        try:
            with fs.open(path, "r") as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise PipelineError(f"no run named {config.resume!r} in {storage} (looked for {path})") from None
        merged = saved["config"]
        given = config.model_dump(mode="json")
        for path_keys in type(config).resumable:
            node_from, node_to = given, merged
            for key in path_keys[:-1]:
                node_from, node_to = node_from[key], node_to[key]
            node_to[path_keys[-1]] = node_from[path_keys[-1]]
        resumed = type(config).model_validate({**merged, "resume": config.resume, "run_name": config.resume})
        if config.engine.workers != resumed.engine.workers and config.engine.workers != 1:
            raise PipelineError(f"run {config.resume} runs with {resumed.engine.workers} workers; resume it with "
                                f"the same number (its data positions are per worker)")
        return resumed, config.resume, saved
    name = config.run_name or f"{config.registry.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if fs.exists(f"{storage}/{name}/{RUN_FILE}"):
        raise PipelineError(f"a run named {name!r} already exists in {storage}: continue it with --resume {name} "
                            "or choose another --run-name")
    return config, name, None


def init_train_ray() -> None:
    """Ray for a training command: the cluster at `RAY_ADDRESS`, else a lean local Ray.

    On a local Ray every process but the training workers takes CPU from them: an idle Ray process wakes 100
    times a second and costs ~0.005-0.01 of a core (sampled from `/proc` during a diffusion run: Ray's processes
    took 0.08 of a core together, each of the two training threads 0.945 of one; 0.06 and 0.955 with this start).
    So a local run starts without what it has no use for: the autoscaler's monitor (`resources` refuses up front
    a request the machine cannot place, which is all the monitor would report), the dashboard agent and task
    events (`init_ray`'s `lean`), and Ray Train's preemption watcher, which polls for nodes being drained, which
    a single local node never is. The API server stays (`init_ray`'s `api_server`)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not twice
    # A local Ray starts its workers at niceness 15, so the training worker loses the CPU to every other
    # process on the machine, down to Ray's own daemons: its steps stall whenever anything else runs.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not settings().ray_address:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    init_ray(lean=True, api_server=True)


def resources(config: Any) -> tuple[bool, int]:
    """GPU or not, and CPUs per worker; a request the local cluster can never place is an error now,
    not a trainer waiting forever."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = config.engine.use_gpu if config.engine.use_gpu is not None else gpus > 0
    workers = config.engine.workers
    cpus = config.engine.cpus_per_worker or (1 if use_gpu else max(1, cluster_cpus() // workers))
    if not settings().ray_address:  # a local Ray does not grow
        if use_gpu and gpus < workers:
            raise PipelineError(f"{workers} GPU workers asked for, this machine has {gpus} GPU(s)")
        if cpus * workers > cluster_cpus():
            raise PipelineError(f"{workers} workers x {cpus} CPUs asked for, this machine has {cluster_cpus()}")
    return use_gpu, cpus


def _prepare_tokenizer(config: PretrainConfig, shards: Any, run_dir: str, console: Console) -> str:
    """The run's tokenizer folder in storage: a copy of --tokenizer, or one trained on the training split."""
    from pipelines.train.data import iter_texts
    from pipelines.train.tokenizer import load_tokenizer, train_tokenizer

    target = f"{run_dir}/tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        if config.tokenizer.tokenizer:
            try:
                tok = load_tokenizer(config.tokenizer.tokenizer)
            except (OSError, ValueError) as exc:
                raise PipelineError(f"cannot load tokenizer {config.tokenizer.tokenizer}: {exc}") from exc
            tok.save_pretrained(tmp)
        else:
            started = time.perf_counter()
            texts = (text for _, text in islice(iter_texts(shards, config.data.heldout_percent, "train"),
                                                config.tokenizer.tokenizer_samples))
            train_tokenizer(texts, config.tokenizer.vocab_size, tmp)
            console.print(f"tokenizer: byte-level BPE, {config.tokenizer.vocab_size} tokens, trained in "
                          f"{time.perf_counter() - started:.1f}s")
        fs, path = filesystem(target)
        fs.makedirs(path, exist_ok=True)
        fs.put(tmp + "/", path, recursive=True)
    return target


def fit(loop: Any, args: dict[str, Any], e: Any, run_name: str, storage: str, use_gpu: bool, cpus: int) -> Any:
    """Run `loop(args)` on `e.workers` Ray Train workers; checkpoints and restarts as the engine config says."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=args,
        scaling_config=ScalingConfig(num_workers=e.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=e.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=e.keep_checkpoints),
            logging_config=ray.LoggingConfig(log_level="WARNING")),
    )
    try:
        return trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends: say what failed, in one line
        mistake = _user_mistake(exc)
        if mistake is not None:  # e.g. the data does not fit the run: a retry fails the same way
            raise PipelineError(f"training stopped: {mistake}") from exc
        raise InfrastructureError(f"training failed: {_error_line(exc)} (checkpoints in {storage}/{run_name}; "
                                  f"continue with --resume {run_name})") from exc


def _user_mistake(exc: BaseException) -> PipelineError | None:
    """The PipelineError a worker raised, if that is what failed the training (Ray wraps it in its own
    exceptions: a WorkerGroupError holds each rank's, a RayTaskError names the original as its `cause`)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        todo.extend(x for x in (e.__cause__, e.__context__, getattr(e, "cause", None)) if isinstance(x, BaseException))
        todo.extend(x for x in (getattr(e, "worker_failures", None) or {}).values() if isinstance(x, BaseException))
    return None


def retry_name(config: Any, name: str) -> Any:
    """`config` to run as `name`: continued from its last checkpoint if an earlier attempt left that run in
    storage (a retry after a worker, node or storage failure), else started under that name."""
    if config.run_name or config.resume:
        return config
    storage = storage_root(config.storage)
    fs, _ = filesystem(storage)
    if fs.exists(f"{storage}/{name}/{RUN_FILE}"):
        return config.model_copy(update={"resume": name})
    return config.model_copy(update={"run_name": name})


def _error_line(exc: BaseException) -> str:
    """The line that names the error in a worker's traceback (Ray wraps it in its own exceptions)."""
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line):
            return line[:500]
    return f"{type(cause).__name__}: {lines[-1][:500] if lines else ''}"


# -- the workers ----------------------------------------------------------------------------------

def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak, then cosine decay to min_ratio x peak at `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def zero_label(e: Any) -> str:
    if e.workers > 1 or e.zero_stage == 0:
        return f"ZeRO-{e.zero_stage}"
    return f"ZeRO-0 (ZeRO-{e.zero_stage} needs 2+ workers)"


def deepspeed_config(config: Any, bf16: bool, world: int) -> dict[str, Any]:
    e = config.engine
    return {
        "train_micro_batch_size_per_gpu": e.micro_batch,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": 0.0 if single_rank_fp32(bf16, world) else config.optim.grad_clip,
        # With one rank ZeRO has nothing to partition, and its flat gradient buffers cost 2-4% per
        # step on a CPU (measured: benchmarks/train_overhead.py); stage 0 computes the same thing.
        "zero_optimization": {"stage": e.zero_stage if world > 1 else 0},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def worker_context(engine: Any, threads: int) -> tuple[int, int, Any, bool]:
    """In a Ray Train worker: (rank, world size, torch device, bf16?), with `threads` torch threads."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    bf16 = engine.precision == "bf16" or (engine.precision == "auto" and device.type == "cuda")
    return ctx.get_world_rank(), ctx.get_world_size(), device, bf16


def single_rank_fp32(bf16: bool, world: int) -> bool:
    return world == 1 and not bf16


def start_engine(model: Any, optimizer: Any, schedule: Any, config: Any, bf16: bool,
                 world: int) -> tuple[Any, Callable[[Any], None]]:
    """`deepspeed.initialize` on our config; returns the engine and the per-micro-batch update
    (backward, then `engine.step()`, which steps the optimizer at the accumulation boundary).

    One fp32 rank is the one case where we bypass two pieces of DeepSpeed's engine: it still all-reduces
    the gradients over its single rank (a flatten, a gloo call and a copy back: the identity), and it
    clips with its own per-tensor norm loop. Together they cost 4-5% of a small model's step on a CPU
    (measured: the tiny CLIP, 74.6 vs 71.7 ms a step, interleaved, 150 steps). There the all-reduce
    is skipped and torch's `clip_grad_norm_` clips at the boundary: the same norm and the same
    factor, so the same losses. With bf16, or 2+ ranks, DeepSpeed does both as usual.
    """
    import deepspeed
    import torch

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(config, bf16, world), dist_init_required=False)
    own_clip = config.optim.grad_clip if single_rank_fp32(bf16, world) else 0.0
    if single_rank_fp32(bf16, world):
        engine.enable_backward_allreduce = False
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def update(loss: Any) -> None:
        engine.backward(loss)
        if own_clip > 0 and engine.is_gradient_accumulation_boundary():
            torch.nn.utils.clip_grad_norm_(params, own_clip)
        engine.step()

    return engine, update


def train_loop(args: dict[str, Any]) -> None:
    """One Ray Train worker: the whole loop, top to bottom."""
    import ray.train
    import torch
    import torch.distributed as dist

    from pipelines.train.data import TokenStream, make_loader, open_shards
    from pipelines.train.model import build_model, flops_per_token, model_config, peak_flops
    from pipelines.train.tokenizer import load_tokenizer

    config = PretrainConfig.model_validate(args["config"])
    e, o = config.engine, config.optim
    rank, world, device, bf16 = worker_context(e, args["threads"])

    with local_copy(args["tokenizer_dir"]) as tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
        mconfig = model_config(config.model, len(tokenizer), config.data.seq_len, tokenizer.bos_token_id,
                               tokenizer.eos_token_id)
        model = build_model(mconfig, e.seed, config.model.activation_checkpointing)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-8)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps,
                                                                          o.min_lr_ratio))
        engine, update = start_engine(model, optimizer, schedule, config, bf16, world)

        shards = open_shards(args["shards"])
        stream = TokenStream(shards, tokenizer_dir, seq_len=config.data.seq_len, micro_batch=e.micro_batch,
                             rank=rank, world_size=world, seed=e.seed, shuffle_buffer=config.data.shuffle_buffer,
                             heldout_percent=config.data.heldout_percent, num_workers=config.data.loader_workers)
        step = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                engine.load_checkpoint(d, tag=DS_TAG)
                step = json.loads(Path(d, "state.json").read_text())["step"]
                stream.load_state_dict(json.loads(Path(d, f"data-rank{rank}.json").read_text()))

        metrics_log = MetricsLog(args) if rank == 0 else None
        if metrics_log and checkpoint:  # a restart after a failure, or a resumed run
            metrics_log.add(step, {"restored_from_step": step})
            metrics_log.flush()
        tokens_per_step = world * e.micro_batch * e.grad_accum * config.data.seq_len
        flops_per_step = flops_per_token(mconfig, config.data.seq_len) * tokens_per_step
        peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
        peak = peak * world if peak else None
        batches = iter(make_loader(stream))
        engine.train()
        stop_at = min(e.max_steps, e.stop_after or e.max_steps)
        loss_value = float("nan")
        while step < stop_at:
            started = time.perf_counter()
            total = torch.zeros((), device=device)
            for _ in range(e.grad_accum):
                batch = next(batches).to(device, non_blocking=True)
                loss = engine(input_ids=batch, labels=batch).loss
                update(loss)
                total += loss.detach().float()
            step += 1
            failpoint(f"pretrain-step-{step}")  # how the tests plant a failure inside a training run
            if world > 1:
                dist.all_reduce(total)
            loss_value = total.item() / (e.grad_accum * world)
            seconds = time.perf_counter() - started
            if metrics_log:
                flops = flops_per_step / seconds  # model FLOPs (6N + attention), not counting recomputation
                metrics_log.add(step, {"loss": loss_value, "lr": schedule.get_last_lr()[0],
                                       "tokens_per_s": tokens_per_step / seconds, "tflops_per_s": flops / 1e12,
                                       **({"mfu": flops / peak} if peak else {}), "step_s": seconds})
            last = step == stop_at
            if step % e.checkpoint_every == 0 or last:
                report = {"step": step, "loss": loss_value, "stopped": last and step < e.max_steps}
                if last and step == e.max_steps:
                    report.update(_evaluate(engine, config, shards, tokenizer_dir, rank, world, device))
                    engine.train()
                if metrics_log:
                    metrics_log.flush()
                save_checkpoint(engine, stream, rank, step, report)
        if metrics_log:
            metrics_log.close()


def save_checkpoint(engine: Any, stream: Any, rank: int, step: int, metrics: dict[str, Any],
                    state: dict[str, Any] | None = None, exclude_frozen: bool = False,
                    extra: Callable[[str], None] | None = None) -> None:
    """A checkpoint: DeepSpeed's files from every rank (without frozen weights if asked), each rank's
    data position, rank 0's `state.json` (and what `extra(folder)` writes there, e.g. EMA weights);
    reported with `metrics`. Ray Train merges the ranks' folders."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/{DS_TAG}", exist_ok=True)
        engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=exclude_frozen)
        Path(d, f"data-rank{rank}.json").write_text(json.dumps(stream.state_dict()))
        if rank == 0:
            Path(d, "state.json").write_text(json.dumps({"step": step, **(state or {})}))
            if extra is not None:
                extra(d)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step-{step:07d}")


def _evaluate(engine: Any, config: PretrainConfig, shards: Any, tokenizer_dir: str, rank: int, world: int,
              device: Any) -> dict[str, float | None]:
    """Mean next-token loss and perplexity on the held-out documents, over all ranks. Every rank reads
    the same held-out sequences and evaluates every world-th one; ranks with fewer batches run dummy
    forwards, so all run the same number (ZeRO-3 gathers parameters in each forward, collectively)."""
    import torch
    import torch.distributed as dist

    from pipelines.train.data import heldout_batches

    e = config.engine
    sequences = heldout_batches(shards, tokenizer_dir, seq_len=config.data.seq_len, micro_batch=1,
                                max_batches=e.eval_batches * e.micro_batch,
                                heldout_percent=config.data.heldout_percent)
    mine = sequences[rank::world]
    batches = [torch.cat(mine[i:i + e.micro_batch]) for i in range(0, len(mine), e.micro_batch)]
    n = torch.tensor([len(batches)], device=device)
    if world > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for i in range(int(n.item())):
            batch = (batches[i] if i < len(batches) else sequences[0]).to(device)
            loss = engine(input_ids=batch, labels=batch).loss
            if i < len(batches):
                tokens = batch.shape[0] * (batch.shape[1] - 1)
                sums += torch.tensor([loss.double().item() * tokens, tokens], device=device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    if sums[1] == 0:
        return {"heldout_loss": None, "heldout_perplexity": None}
    mean = (sums[0] / sums[1]).item()
    return {"heldout_loss": mean, "heldout_perplexity": math.exp(min(mean, 50.0))}


class MetricsLog:
    """Rank 0's per-step metrics, sent to MLflow in batches by a background thread, so that writing them
    never stalls a step (a batch is an SQL transaction, tens of ms on SQLite, more on a remote server).
    `flush` waits until everything added so far is written: before a checkpoint, so that a run restarted
    from it lacks no metric of the steps it does not repeat. A failed write is raised by the next call."""

    def __init__(self, args: dict[str, Any]):
        import queue
        import threading

        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=args["tracking_uri"])
        self.run_id = args["mlflow_run_id"]
        self.every = args["config"]["engine"]["log_every"]
        self.quiet = args["config"]["quiet"]
        self.pending: list[Any] = []
        self.last_sent = time.monotonic()
        self.batches: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.writer = threading.Thread(target=self._write, name="mlflow-metrics", daemon=True)
        self.writer.start()

    def add(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        self._raise()
        if step % self.every == 0 or "loss" not in values:
            now = int(time.time() * 1000)
            self.pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if "loss" in values and not self.quiet and (step % 10 == 0 or step == 1):
            mfu = (f", MFU {values['mfu']:.1%}" if "mfu" in values
                   else f", {1000 * values['tflops_per_s']:.1f} GFLOP/s" if "tflops_per_s" in values else "")
            rate = (f"{values['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in values
                    else f"{values['samples_per_s']:.0f} samples/s")
            print(f"step {step}: loss {values['loss']:.4f}, lr {values['lr']:.2e}, {rate}{mfu}", flush=True)
        if time.monotonic() - self.last_sent > 5 or len(self.pending) > 900:  # MLflow takes 1000 a batch
            self._send()

    def flush(self) -> None:
        """Write everything added so far, and wait until it is written."""
        self._send()
        self.batches.join()
        self._raise()

    def close(self) -> None:
        self.flush()
        self.batches.put(None)
        self.writer.join()

    def _send(self) -> None:
        if self.pending:
            self.batches.put(self.pending)
            self.pending = []
        self.last_sent = time.monotonic()

    def _write(self) -> None:
        while True:
            batch = self.batches.get()
            try:
                if batch is None:
                    return
                if self.error is None:
                    self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # handed to the training thread, which raises it
                self.error = exc
            finally:
                self.batches.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


# -- export ---------------------------------------------------------------------------------------

def export_model(checkpoint_dir: str, tokenizer_dir: str, model_dir: str, config: PretrainConfig) -> None:
    """Consolidate a DeepSpeed checkpoint (any ZeRO stage, any number of ranks) into a Hugging Face
    folder: fp32 weights in safetensors, the config and the tokenizer; `from_pretrained` loads it."""
    from pipelines.train.model import model_config
    from pipelines.train.tokenizer import load_tokenizer
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with (local_copy(tokenizer_dir) as local_tokenizer, tempfile.TemporaryDirectory() as out,
          contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())):
        # (DeepSpeed's consolidation prints its progress; failures still raise)
        tokenizer = load_tokenizer(local_tokenizer)
        mconfig = model_config(config.model, len(tokenizer), config.data.seq_len, tokenizer.bos_token_id,
                               tokenizer.eos_token_id)
        mconfig.use_cache = True
        state = checkpoint_state(checkpoint_dir)
        model = LlamaForCausalLM(mconfig)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not (mconfig.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {checkpoint_dir} does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        model.tie_weights()
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        fs, path = filesystem(model_dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(out + "/", path, recursive=True)


def checkpoint_state(checkpoint_dir: str) -> dict[str, Any]:
    """The model's full state dict from a DeepSpeed checkpoint of any ZeRO stage and any number of ranks."""
    import torch

    # The consolidation runs on this CPU whatever the workers ran on; saying so spares DeepSpeed's
    # accelerator probe and its warning. (Only for this import: Ray workers must probe their own.)
    chosen = "DS_ACCELERATOR" in os.environ
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    finally:
        if not chosen:
            os.environ.pop("DS_ACCELERATOR", None)

    if not any(Path(checkpoint_dir, DS_TAG).glob("zero_pp_rank_*")):  # saved without ZeRO
        return torch.load(Path(checkpoint_dir, DS_TAG, "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=False)["module"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)  # (it prints its progress)


# -- storage helpers ------------------------------------------------------------------------------

class local_copy:
    """A local folder with the contents of `url`: the folder itself when local, else a temporary download."""

    def __init__(self, url: str):
        self.url = url
        self.tmp: str | None = None

    def __enter__(self) -> str:
        fs, path = filesystem(self.url)
        if is_local(fs):
            return path
        self.tmp = tempfile.mkdtemp(prefix="pipelines-")
        fs.get(path.rstrip("/") + "/", self.tmp, recursive=True)
        return self.tmp

    def __exit__(self, *exc: Any) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def storage_root(storage: str | None) -> str:
    """Where runs live: the configured folder or URL, else `$PIPELINES_HOME/train`."""
    return absolute((storage or str(settings().home / "train")).rstrip("/"))


def write_json(fs: Any, url: str, data: Any) -> None:
    _, path = filesystem(url)
    write_file(fs, path, json.dumps(data, indent=2).encode())
