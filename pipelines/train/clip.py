"""`pipelines pretrain --kind clip`: contrastive pretraining of a CLIP-style image-text model on Ray Train +
DeepSpeed, from the image shards of `pipelines crawl images` (`KEY.jpg`/`.webp`/`.png` + `KEY.txt` caption).

The same engine as the language model (`pipelines/train/pretrain.py`): the driver resolves the run,
trains the caption tokenizer, opens the MLflow run and starts a `TorchTrainer`; every worker runs
`clip_train_loop`: `deepspeed.initialize`, then a plain loop of micro-batches with the symmetric InfoNCE
loss over the whole batch of all ranks (features all-gathered) and CLIP's learnable temperature, and
checkpoints through `ray.train.report`. At the end rank 0 measures held-out recall@1/5 in both directions,
and the driver exports a `ClipBundle` folder and registers it (higher image->text recall@1 is better).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import IterableDataset

from pipelines.errors import PipelineError
from pipelines.runtime import filesystem
from pipelines.shards import IMAGE_EXTS, TAR_ERRORS, image_of, read_tar
from pipelines.train.clip_config import ClipDataConfig, ClipModelConfig, ClipPretrainConfig  # noqa: F401
from pipelines.train.clip_model import IMAGE_MEAN, IMAGE_STD, ClipBundle
from pipelines.train.data import EMPTY_EPOCHS, ShardSet, is_heldout, training_samples
from pipelines.train.pretrain import (DS_TAG, MetricsLog, Pretraining, PretrainResult, checkpoint_state, drive,
                                      local_copy, lr_lambda, save_checkpoint, start_engine, worker_context)

log = logging.getLogger(__name__)

STATE_FORMAT = "pipelines.train.ImageCaptionStream/v1"
RECALL_METRIC = "heldout_i2t_recall_at_1"


# -- data -----------------------------------------------------------------------------------------

def read_image_tar(url: str) -> list[tuple[str, bytes, str]]:
    """(key, image bytes, caption) of every sample of an image shard tar with both an image (any format the
    crawl writes) and a `.txt`, in tar order; a tar that cannot be read counts as empty, with a warning (as
    `data.read_texts`)."""
    try:
        samples = read_tar(url, (*IMAGE_EXTS, "txt"))
    except TAR_ERRORS as exc:
        log.warning("%s: cannot read, skipped (%s: %s)", url, type(exc).__name__, exc)
        return []
    return [(key, image[1], s["txt"].decode("utf-8", "replace")) for key, s in samples.items()
            if "txt" in s and (image := image_of(s)) is not None]


def heldout_pairs(shards: ShardSet, heldout_percent: float, limit: int) -> list[tuple[str, bytes, str]]:
    """The first `limit` held-out (key, image, caption) pairs, in shard order; the same on every call."""
    pairs: list[tuple[str, bytes, str]] = []
    for url in shards.tars:
        pairs += [p for p in read_image_tar(url) if is_heldout(p[0], heldout_percent)]
        if len(pairs) >= limit:
            break
    return pairs[:limit]


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def image_tensor(data: bytes, size: int, rng: np.random.Generator | None = None, crop_scale: float = 1.0,
                 hflip: bool = False) -> np.ndarray:
    """A `[3, size, size]` float32 array, normalised as CLIP's. Without `rng`: shorter side to `size`, centre
    crop (the image processor's view); with it: a random crop of `crop_scale`..1 of the area (aspect 3/4..4/3)
    resized to `size`, flipped left-right half the time if `hflip`."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    if rng is None:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        area = w * h * rng.uniform(crop_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1).astype(np.float32)


@dataclass(frozen=True)
class PairCursor:
    """A place in a stream's pairs: the `sample`-th pair of the `tar`-th tar of the stream's tar list for
    `epoch`; `index` is its running index among the training pairs the stream looks at in the epoch."""

    epoch: int = 0
    tar: int = 0
    sample: int = 0
    index: int = 0


class ImageCaptionStream:
    """Infinite, deterministic, resumable micro-batches of one rank: `(pixels [B, 3, S, S], input_ids [B, L],
    attention_mask [B, L])`. The split and the shuffle follow `data.TokenStream` (one stream per rank): with
    at least `world_size` tars rank r reads tars r, r+world, ... of each epoch's shuffled tar order, with fewer
    every rank reads every tar and takes every world-th training pair; pairs are shuffled in chunks of
    `shuffle_buffer`, each permuted from (seed, rank, chunk). Augmentation draws from (seed, epoch, key), so a
    resumed stream gives the same pixels. Held-out keys (`is_heldout`) never enter it.

    A subclass may read other samples (`read`: a tar's (key, data, caption) triples) and batch them its own
    way (`_batch`); the split, shuffle and position stay these (the diffusion stream does)."""

    read = staticmethod(read_image_tar)

    def __init__(self, shards: ShardSet, tokenizer: Any, *, image_size: int, max_text_len: int, micro_batch: int,
                 rank: int, world_size: int, seed: int, shuffle_buffer: int, heldout_percent: float,
                 augment: bool = True, crop_scale: float = 0.6, hflip: bool = True):
        self.shards, self.tokenizer = shards, tokenizer
        self.image_size, self.max_text_len, self.micro_batch = image_size, max_text_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.heldout_percent = shuffle_buffer, heldout_percent
        self.augment, self.crop_scale, self.hflip = augment, crop_scale, hflip
        self._position = {"chunk": 0, "emitted": 0, **asdict(PairCursor())}

    def _settings(self) -> dict[str, Any]:
        return {"digest": self.shards.digest, "seed": self.seed, "image_size": self.image_size,
                "max_text_len": self.max_text_len, "micro_batch": self.micro_batch, "rank": self.rank,
                "world_size": self.world_size, "shuffle_buffer": self.shuffle_buffer,
                "heldout_percent": self.heldout_percent, "augment": self.augment, "crop_scale": self.crop_scale,
                "hflip": self.hflip}

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last batch handed out (JSON-serialisable)."""
        return {"format": STATE_FORMAT, **self._settings(), "position": dict(self._position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state` stood; call before iterating."""
        if state.get("format") != STATE_FORMAT:
            raise PipelineError(f"data state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for name, value in self._settings().items():
            if state.get(name) != value:
                raise PipelineError(f"data state: {name} was {state.get(name)!r}, now {value!r}; "
                                    "a stream resumes exactly only with the same shards and settings")
        self._position = dict(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for rows in self._micro_batches():
            yield self._batch(rows)

    def _micro_batches(self) -> Iterator[list[tuple[PairCursor, str, bytes, str]]]:
        """The rows of each micro-batch, undecoded; `_position` is the position after it when it is handed out."""
        position = self._position
        chunk, emitted = position["chunk"], position["emitted"]
        start = PairCursor(**{k: position[k] for k in ("epoch", "tar", "sample", "index")})
        pairs = self._pairs(start)
        upcoming = next(pairs)  # read one ahead: the next chunk's start is the position after a chunk's last batch
        rows: list[tuple[PairCursor, str, bytes, str]] = []
        while True:
            buffer = [upcoming, *islice(pairs, self.shuffle_buffer - 1)]
            upcoming = next(pairs)
            order = np.random.default_rng([self.seed, self.rank, chunk]).permutation(len(buffer))
            for i in order[emitted:]:
                rows.append(buffer[i])
                emitted += 1
                if len(rows) == self.micro_batch:
                    if emitted < len(buffer):
                        self._position = {"chunk": chunk, "emitted": emitted, **asdict(start)}
                    else:
                        self._position = {"chunk": chunk + 1, "emitted": 0, **asdict(upcoming[0])}
                    yield rows
                    rows = []
            chunk, emitted, start = chunk + 1, 0, upcoming[0]

    def _batch(self, rows: list[tuple[PairCursor, str, bytes, str]]) -> tuple[torch.Tensor, ...]:
        pixels = []
        for cursor, key, data, _ in rows:
            rng = np.random.default_rng([self.seed, cursor.epoch, _key_seed(key)]) if self.augment else None
            pixels.append(image_tensor(data, self.image_size, rng, self.crop_scale, self.hflip))
        text = ClipBundle(None, self.tokenizer, None, self.max_text_len).tokenize([caption for *_, caption in rows])
        return torch.from_numpy(np.stack(pixels)), text["input_ids"], text["attention_mask"]

    def _pairs(self, start: PairCursor) -> Iterator[tuple[PairCursor, str, bytes, str]]:
        """This rank's training pairs from `start` on, each with its cursor, through epoch after epoch."""
        walk = training_samples(
            self.shards, self.seed, self.rank, self.world_size, self.heldout_percent, self.read,
            (start.epoch, start.tar, start.sample, start.index),
            f"{self.shards.url}: rank {self.rank} of {self.world_size} found no training image-caption pair in "
            f"{EMPTY_EPOCHS} epochs (no pairs with both an image and a .txt, all held out, or unreadable tars)")
        for epoch, t, k, index, (key, data, caption) in walk:
            yield PairCursor(epoch, t, k, index), key, data, caption


class _PositionedBatches(IterableDataset):
    """What loader process w of a `BatchLoader`'s W runs: the stream's micro-batches w, w+W, w+2W, ..., each
    made (decoded, augmented, tokenized) and sent with the stream's position after it; the other processes'
    rows are read (tar bytes) but not decoded."""

    def __init__(self, stream: ImageCaptionStream):
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[Any, dict[str, int]]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i, rows in enumerate(self.stream._micro_batches()):
            if i % workers == worker:
                yield self.stream._batch(rows), dict(self.stream._position)


class BatchLoader:
    """An `ImageCaptionStream`'s batches (or a subclass's) made in `workers` loader processes, ahead of the
    training thread (about `prefetch` batches), in the stream's own order: process w makes batches w, w+W, ...
    and the DataLoader hands them out from the processes in turn. Each batch comes with the position after it,
    which the stream takes as the batch is handed out: `state_dict()` matches the batches handed out so far, so
    a checkpoint resumes exactly where the steps stopped."""

    def __init__(self, stream: ImageCaptionStream, workers: int = 1, prefetch: int = 4):
        if workers < 1:
            raise ValueError(f"workers {workers}: a BatchLoader needs at least one loader process")
        self.stream, self.workers, self.prefetch = stream, workers, prefetch

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        loader = DataLoader(_PositionedBatches(self.stream), batch_size=None, num_workers=self.workers,
                            prefetch_factor=-(-self.prefetch // self.workers), in_order=True,
                            pin_memory=torch.cuda.is_available())
        for batch, position in loader:
            self.stream._position = position
            yield batch


def stream_batches(stream: ImageCaptionStream, loader_workers: int) -> Iterator[Any]:
    """What a training loop iterates: the stream's batches made in the training thread (0 loader workers) or
    in that many loader processes; either way `stream.state_dict()` matches the batches handed out."""
    return iter(BatchLoader(stream, loader_workers) if loader_workers else stream)


# -- the driver -----------------------------------------------------------------------------------

def pretrain_clip(config: ClipPretrainConfig) -> PretrainResult:
    """Train (or continue) a CLIP-style image-text model as the config says; export and register it at the end."""
    from pipelines.train import registry

    if config.engine.zero_stage == 3:
        raise PipelineError("engine.zero_stage 3 is not supported for CLIP (the loss reads the temperature "
                            "outside the forward pass); use 0-2")
    return drive(config, Pretraining(
        "pretrain-clip", "CLIP", "`pipelines crawl images` or `pipelines curate`", clip_train_loop,
        _prepare_tokenizer, export_clip,
        lambda m: {k: float(v) for k, v in m.items() if k.startswith("heldout_") and v is not None},
        RECALL_METRIC, "held-out image->text recall@1", registry.register_clip,
        "no held-out pairs to measure recall on", shards_kind="images"))


def _prepare_tokenizer(config: ClipPretrainConfig, shards: ShardSet, run_dir: str, console: Console) -> str:
    """The run's tokenizer folder in storage: a copy of --tokenizer, or one trained on the training captions."""
    from pipelines.train.data import iter_texts
    from pipelines.train.tokenizer import load_tokenizer, train_tokenizer

    target = f"{run_dir}/tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        if config.tokenizer.tokenizer:
            load_tokenizer(config.tokenizer.tokenizer).save_pretrained(tmp)
        else:
            started = time.perf_counter()
            captions = (text for _, text in islice(iter_texts(shards, config.data.heldout_percent, "train"),
                                                   config.tokenizer.tokenizer_samples))
            train_tokenizer(captions, config.tokenizer.vocab_size, tmp)
            console.print(f"tokenizer: byte-level BPE, {config.tokenizer.vocab_size} tokens, trained on captions in "
                          f"{time.perf_counter() - started:.1f}s")
        fs, path = filesystem(target)
        fs.makedirs(path, exist_ok=True)
        fs.put(tmp + "/", path, recursive=True)
    return target


# -- the workers ----------------------------------------------------------------------------------

class GatherWithGrad(torch.autograd.Function):
    """`all_gather` of every rank's rows (the same count on each) that passes gradients back: each rank's rows
    get the sum of the gradients every rank's loss sends them (an all_reduce, which gloo and NCCL both have)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, world: int) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the whole batch of all ranks: pair i's image should pick caption i among
    all captions and the reverse; the temperature is learnt (exp(logit_scale), capped at 100 as CLIP does).
    Every rank computes the same loss; DeepSpeed's gradient averaging then gives the full-batch gradient."""
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    if world > 1:
        image, text = GatherWithGrad.apply(image), GatherWithGrad.apply(text)
    logits = logit_scale.float().exp().clamp(max=100) * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2


def clip_train_loop(args: dict[str, Any]) -> None:
    """One Ray Train worker: the whole loop, top to bottom."""
    import ray.train
    import torch.distributed as dist

    from pipelines.train.clip_model import build_clip, image_processor
    from pipelines.train.data import open_shards
    from pipelines.train.tokenizer import load_tokenizer

    config = ClipPretrainConfig.model_validate(args["config"])
    e, o, d = config.engine, config.optim, config.data
    rank, world, device, bf16 = worker_context(e, args["threads"])

    with local_copy(args["tokenizer_dir"]) as tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    model = build_clip(config.model, tokenizer, e.seed)
    # DeepSpeed's start-up broadcast views every parameter as bytes, which a 0-d tensor cannot do: the
    # temperature trains as a 1-element vector (export_clip gives it back its shape).
    model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms, biases, the temperature
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, e.max_steps, o.min_lr_ratio))
    engine, update = start_engine(model, optimizer, schedule, config, bf16, world)

    shards = open_shards(args["shards"])
    stream = ImageCaptionStream(shards, tokenizer, image_size=config.model.image_size,
                                max_text_len=config.model.max_text_len, micro_batch=e.micro_batch, rank=rank,
                                world_size=world, seed=e.seed, shuffle_buffer=d.shuffle_buffer,
                                heldout_percent=d.heldout_percent, augment=d.augment, crop_scale=d.crop_scale,
                                hflip=d.hflip)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as c:
            engine.load_checkpoint(c, tag=DS_TAG)
            step = json.loads(Path(c, "state.json").read_text())["step"]
            stream.load_state_dict(json.loads(Path(c, f"data-rank{rank}.json").read_text()))

    metrics_log = MetricsLog(args) if rank == 0 else None
    if metrics_log and checkpoint:  # a restart after a failure, or a resumed run
        metrics_log.add(step, {"restored_from_step": step})
        metrics_log.flush()
    samples_per_step = world * e.micro_batch * e.grad_accum
    batches = stream_batches(stream, d.loader_workers)
    engine.train()
    stop_at = min(e.max_steps, e.stop_after or e.max_steps)
    while step < stop_at:
        started = time.perf_counter()
        total = torch.zeros((), device=device)
        for _ in range(e.grad_accum):
            pixels, input_ids, attention_mask = (t.to(device, non_blocking=True) for t in next(batches))
            out = engine(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=pixels.to(torch.bfloat16 if bf16 else torch.float32))
            loss = contrastive_loss(out.image_embeds, out.text_embeds, engine.module.logit_scale, world)
            update(loss)
            total += loss.detach().float()
        step += 1
        loss_value = total.item() / e.grad_accum  # the same on every rank: the loss is over all ranks' pairs
        seconds = time.perf_counter() - started
        if metrics_log:
            metrics_log.add(step, {"loss": loss_value, "lr": schedule.get_last_lr()[0],
                                   "samples_per_s": samples_per_step / seconds, "step_s": seconds,
                                   "temperature": 1 / engine.module.logit_scale.detach().float().exp().item()})
        last = step == stop_at
        if step % e.checkpoint_every == 0 or last:
            report = {"step": step, "loss": loss_value, "stopped": last and step < e.max_steps}
            if last and step == e.max_steps and rank == 0:  # parameters are whole on every rank below ZeRO-3
                bundle = ClipBundle(engine.module, tokenizer, image_processor(config.model.image_size),
                                    config.model.max_text_len)
                report.update(evaluate_recall(bundle, heldout_pairs(shards, d.heldout_percent,
                                                                    e.eval_batches * e.micro_batch)))
                engine.train()
            if metrics_log:
                metrics_log.flush()
            if world > 1:
                dist.barrier()  # the other ranks wait for rank 0's evaluation
            save_checkpoint(engine, stream, rank, step, report)
    if metrics_log:
        metrics_log.close()


def evaluate_recall(bundle: ClipBundle, pairs: list[tuple[str, bytes, str]]) -> dict[str, float]:
    """Recall@1/5 of the held-out pairs in both directions. The candidates are the distinct captions (pairs
    that share a caption are one class): image->text is a hit when the image's own caption ranks in the top
    k captions, text->image when one of the top k images carries the caption."""
    if not pairs:
        return {}
    bundle.model.eval()
    image = torch.from_numpy(bundle.embed_images([data for _, data, _ in pairs]))
    captions = sorted({caption for *_, caption in pairs})
    text = torch.from_numpy(bundle.embed_texts(captions))
    truth = torch.tensor([captions.index(caption) for *_, caption in pairs])
    similarity = image @ text.T  # [images, captions]
    metrics = {"heldout_pairs": float(len(pairs)), "heldout_captions": float(len(captions))}
    for k in (1, 5):
        top_text = similarity.topk(min(k, len(captions)), dim=1).indices
        metrics[f"heldout_i2t_recall_at_{k}"] = (top_text == truth[:, None]).any(1).float().mean().item()
        top_images = similarity.T.topk(min(k, len(pairs)), dim=1).indices  # [captions, k]
        hits = truth[top_images] == torch.arange(len(captions))[:, None]
        metrics[f"heldout_t2i_recall_at_{k}"] = hits.any(1).float().mean().item()
    return metrics


# -- export ---------------------------------------------------------------------------------------

def export_clip(checkpoint_dir: str, tokenizer_dir: str, model_dir: str, config: ClipPretrainConfig) -> None:
    """The last checkpoint as a `ClipBundle` folder (fp32 safetensors, config, tokenizer, image processor)
    that `load_clip` loads."""
    from pipelines.train.clip_model import build_clip, image_processor
    from pipelines.train.tokenizer import load_tokenizer

    with local_copy(tokenizer_dir) as local_tokenizer, tempfile.TemporaryDirectory() as out:
        tokenizer = load_tokenizer(local_tokenizer)
        model = build_clip(config.model, tokenizer)
        state = checkpoint_state(checkpoint_dir)
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {checkpoint_dir} does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        ClipBundle(model, tokenizer, image_processor(config.model.image_size), config.model.max_text_len).save(out)
        fs, path = filesystem(model_dir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(out + "/", path, recursive=True)
