"""`pipelines encode`: image shards -> latent shards, with a registered autoencoder, once.

A latent diffusion model trains on the autoencoder's latents, not on pixels. Encoding every batch during
training costs as much again as the training step (MosaicML measured 1.4x the time of training on
precomputed latents), so the shards are encoded once, here, into new shards on storage:

    KEY.latent.npy   float16 [C, h, w]: the posterior MEAN x `scaling_factor` (not a sample of the
                     posterior: the mean is deterministic, and its spread is tiny next to the noise the
                     diffusion adds; a trainer wanting the sample cannot get it back from the mean)
    KEY.txt          the caption, byte for byte as in the input
    KEY.json         source key and shard, the image's width and height (and `text_len` with --clip)
    KEY.text.npy     with --clip: float16 [max_text_len, hidden], the text tower's per-token states
                     (`last_hidden_state`) of the caption, tokenized as diffusers' StableDiffusionPipeline
                     does (padded to the tower's length, no attention mask), so they equal what the
                     denoiser is conditioned on when sampling

One output shard per input shard, in `pipelines.shards`' layout (tar + parquet + stats, a manifest of
kind `latents` naming the input shards and the autoencoder's exact version). Each image is resized
(shorter side to `image_size`, bicubic) and centre-cropped, scaled to [-1, 1].

One Ray task per shard, on a GPU when the cluster has them. Tasks rather than an actor pool: Ray's
retries of a task whose worker died come for free, and a worker process that ran a shard is reused for
the next one, so a module-level cache (`_MODELS`) loads the autoencoder once per worker anyway. The
driver fetches the models once and ships their files through Ray's object store, so a worker on another
machine needs neither the driver's disk nor MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipelines.errors import PipelineError
from pipelines.runtime import cluster_cpus, filesystem, init_ray, settings
from pipelines.shards import (TAR_ERRORS, ShardOutput, ShardWriter, absolute, image_of, owned, read_manifest,
                              shard_files, shard_name, tar_samples, url_of, write_manifest)
from pipelines.train.encode_config import EncodeConfig

KIND = "latents"
METADATA_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()), ("caption", pa.string()),
    ("source_shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("text_len", pa.int32()),
])
STATUSES = ("success", "missing_caption", "missing_image", "failed_to_decode", "non_finite_latent")
DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default, for a config.json that leaves it out
START_OVER = "encode with the same settings, write to another --output, or pass --overwrite"


@dataclass
class EncodeResult:
    manifest: dict[str, Any]
    written: int = 0  # shards encoded by this run
    skipped: int = 0  # shards already done
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard name -> why
    encoded: int = 0  # samples encoded by this run
    rejected: int = 0  # samples of this run's shards left out (status other than success)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_shards


@dataclass(frozen=True)
class ModelSource:
    """A model as the run pinned it: where it came from, what identifies it, and its files in Ray's object store."""

    kind: str  # "autoencoder" or "clip"
    given: str  # as the user wrote it
    name: str | None  # registered name and version; None for a local folder
    version: int | None
    identity: str  # models:/NAME/VERSION, or sha256 of a local folder's files
    config: dict[str, Any]  # its config.json
    files: Any = None  # ObjectRef of {relative path: bytes}, set once Ray is up

    def lineage(self) -> dict[str, Any]:
        folder = {} if self.name else {"folder": self.given}
        return {"uri": self.given, "name": self.name, "version": self.version, **folder, "identity": self.identity}


@dataclass(frozen=True)
class ShardJob:
    """What a shard task needs. The model files stay references: Ray resolves only top-level arguments, so a
    worker that already holds the models never fetches them again."""

    shard: int
    tar: str  # URL of the input tar
    sha256: str | None  # the input tar's, from its manifest
    output: str
    image_size: int
    batch_size: int
    scaling_factor: float
    use_gpu: bool
    identity_digest: str
    identity: dict[str, Any]
    autoencoder: ModelSource
    clip: ModelSource | None


def encode(config: EncodeConfig) -> EncodeResult:
    """Encode image shards into latent shards with an autoencoder, once, for training a latent diffusion model
    without encoding every step: one output shard per input shard, each sample's KEY.latent.npy (float16
    [C, h, w], the posterior mean x the autoencoder's scaling_factor), KEY.txt (its caption) and KEY.json, and
    with --clip KEY.text.npy (the CLIP text tower's per-token states of the caption). A rerun skips the shards
    already done; images that cannot be decoded and samples without a caption are left out, recorded in each
    shard's parquet and counted."""
    started = time.time()
    manifest = read_manifest(config.shards)
    if manifest.get("kind") != "images":
        raise PipelineError(f"{config.shards}: {manifest.get('kind') or 'unknown'} shards, not images "
                            "(encode the output of `pipelines crawl images` or `pipelines curate`)")
    autoencoder = _model_source("autoencoder", config.autoencoder)
    vae = autoencoder.config
    if vae.get("_class_name") != "AutoencoderKL":
        raise PipelineError(f"{config.autoencoder}: a {vae.get('_class_name') or 'unknown'} model, "
                            "not a diffusers AutoencoderKL")
    downsample = 2 ** (len(vae["block_out_channels"]) - 1)
    image_size = config.image_size or vae.get("sample_size")
    if not isinstance(image_size, int) or image_size % downsample:
        raise PipelineError(f"image_size {image_size} is not a multiple of the autoencoder's downsampling "
                            f"factor {downsample} (set --image-size)")
    clip = _model_source("clip", config.clip) if config.clip else None
    identity = {"input_digest": manifest["digest"], "autoencoder": autoencoder.identity, "image_size": image_size,
                "clip": clip.identity if clip else None}
    identity_digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    lineage = {
        "input": {"path": absolute(config.shards), "digest": manifest["digest"], "kind": "images",
                  "samples": manifest.get("samples")},
        "autoencoder": {**autoencoder.lineage(), "scaling_factor": vae.get("scaling_factor", DEFAULT_SCALING_FACTOR),
                        "shift_factor": vae.get("shift_factor"), "latent_channels": vae["latent_channels"],
                        "downsample_factor": downsample, "image_size": image_size},
        "latents": {"shape": [vae["latent_channels"], image_size // downsample, image_size // downsample],
                    "dtype": "float16", "value": "posterior mean x scaling_factor"},
    }
    if clip:
        text = clip.config.get("text_config", {})
        lineage["clip"] = {**clip.lineage(), "max_text_len": text.get("max_position_embeddings"),
                           "hidden_size": text.get("hidden_size")}
    out = ShardOutput(config.output)  # only once the models resolve: a mistake leaves no output folder behind
    with owned(out):
        if config.overwrite:
            out.remove_shards()
        return _encode(config, out, manifest, autoencoder, clip, identity, identity_digest, lineage, started)


def _encode(config: EncodeConfig, out: ShardOutput, manifest: dict[str, Any], autoencoder: ModelSource,
            clip: ModelSource | None, identity: dict[str, Any], identity_digest: str, lineage: dict[str, Any],
            started: float) -> EncodeResult:
    done = {sid: out.read_json(shard_files(sid)[2]) for sid in sorted(out.done_shards())}
    _check_resumable(config.output, done, identity)
    init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0 and not settings().ray_address:  # a local Ray does not grow
        raise PipelineError("--use-gpu asked for, and this machine's Ray has no GPU")
    todo = [s for s in manifest["shards"] if int(s["name"]) not in done]
    if todo:  # shipped once per run; each worker fetches them only when its cache misses
        autoencoder = _shipped(autoencoder)
        clip = _shipped(clip) if clip else None
    # Shard tasks run in other processes, maybe on other machines: they get URLs, never bare paths.
    in_fs, in_root = filesystem(config.shards)
    in_url = url_of(in_fs, in_root.rstrip("/"))
    out_url = url_of(out.fs, out.root)
    jobs = [ShardJob(shard=int(s["name"]), tar=f"{in_url}/{s['tar']}", sha256=s.get("sha256"), output=out_url,
                     image_size=identity["image_size"], batch_size=config.batch_size,
                     scaling_factor=lineage["autoencoder"]["scaling_factor"], use_gpu=use_gpu,
                     identity_digest=identity_digest, identity=identity, autoencoder=autoencoder, clip=clip)
            for s in todo]
    stats_by_shard = dict(done)
    console = Console(stderr=True, quiet=config.quiet)
    failed = _run_jobs(jobs, config, use_gpu, gpus, console, stats_by_shard, skipped=len(done))

    fresh = [stats_by_shard[j.shard] for j in jobs if j.shard in stats_by_shard]
    status = Counter()
    for s in stats_by_shard.values():
        status.update(s["status"])
    elapsed = time.time() - started
    encoded = sum(s["samples"] for s in fresh)
    run_stats = {
        "status": dict(sorted(status.items())),
        "shards_written": len(fresh), "shards_skipped": len(done), "shards_failed": len(failed),
        "failed_shards": failed, "samples_encoded": encoded,
        "samples_rejected": sum(s["count"] - s["samples"] for s in fresh),
        "elapsed_s": round(elapsed, 3), "samples_per_s": round(encoded / elapsed, 1) if elapsed else 0.0,
        "use_gpu": use_gpu,
    }
    manifest_out = write_manifest(out, KIND, config.model_dump(mode="json"), identity_digest,
                                  list(stats_by_shard.values()), run_stats, extra=lineage)
    result = EncodeResult(manifest_out, written=len(fresh), skipped=len(done), failed_shards=failed,
                          encoded=encoded, rejected=run_stats["samples_rejected"], elapsed_s=elapsed)
    if not config.quiet:
        print_summary(console, config.output, result)
    if failed:  # fails the command: said even when quiet
        Console(stderr=True).print(
            f"[red]{len(failed)} shard(s) failed: "
            + "; ".join(f"{name} ({escape(why)})" for name, why in sorted(failed.items()))
            + ". Their samples are not in the output; rerun the same command to retry them.[/red]",
            highlight=False, soft_wrap=True)
    return result


def _check_resumable(output: str, done: dict[int, dict[str, Any]], identity: dict[str, Any]) -> None:
    """Refuse, before any work, to add shards to an output encoded from other input or with other models."""
    labels = {"input_digest": "input shards (manifest digest)", "autoencoder": "autoencoder",
              "image_size": "image size", "clip": "CLIP"}
    for sid, stats in done.items():
        before = stats.get("encoding") or {}
        for key, label in labels.items():
            if before.get(key) != identity[key]:
                raise PipelineError(f"{output}: shard {sid:05d} was encoded with {label} {_short(before.get(key))}, "
                                    f"not {_short(identity[key])}; {START_OVER}")


def _short(value: Any) -> Any:
    """A digest cut to what tells two apart in a message (`sha256:0a1b2c3d4e5f`)."""
    text = str(value)
    hexpart = text.removeprefix("sha256:")
    return text[:len(text) - len(hexpart) + 12] if len(hexpart) == 64 else value


def _model_source(kind: str, given: str) -> ModelSource:
    """The model `given` (models:/... or a local folder), pinned: a registered one to its exact version."""
    from pipelines.train import registry

    if given.startswith("models:/"):
        registry.configure_tracking()
        name, version = registry.resolve_version(given)
        pinned = f"models:/{name}/{version}"
        download = tempfile.mkdtemp(prefix=f"pipelines-{kind}-")
        try:
            files = _folder_files(registry.registered_folder(kind, pinned, download))
        finally:
            shutil.rmtree(download, ignore_errors=True)
        source = ModelSource(kind, given, name, version, pinned, _model_config(files, given), files)
    else:
        if not Path(given).is_dir():
            raise PipelineError(f"{given}: not a registered model (models:/NAME@ALIAS) nor a model folder")
        files = _folder_files(given)
        digest = hashlib.sha256()
        for rel in sorted(files):
            digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        source = ModelSource(kind, str(Path(given).absolute()), None, None, f"sha256:{digest.hexdigest()}",
                             _model_config(files, given), files)
    if kind == "autoencoder" and "diffusion_pytorch_model.safetensors" not in source.files:
        raise PipelineError(f"{given}: not an autoencoder folder (no diffusion_pytorch_model.safetensors)")
    return source


def _folder_files(folder: str) -> dict[str, bytes]:
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _model_config(files: dict[str, bytes], given: str) -> dict[str, Any]:
    try:
        return json.loads(files["config.json"])
    except KeyError:
        raise PipelineError(f"{given}: not a model folder (no config.json)") from None
    except ValueError as exc:
        raise PipelineError(f"{given}: config.json is not JSON ({exc})") from None


def _shipped(source: ModelSource) -> ModelSource:
    """`source` with its files put in Ray's object store (a reference instead of the bytes)."""
    return ModelSource(source.kind, source.given, source.name, source.version, source.identity, source.config,
                       ray.put(source.files))


# Running shard tasks -----------------------------------------------------------------------------

def _run_jobs(jobs: list[ShardJob], config: EncodeConfig, use_gpu: bool, gpus: int, console: Console,
              stats_by_shard: dict[int, dict[str, Any]], skipped: int) -> dict[str, str]:
    """Run the shard tasks, at most `max_in_flight` at once, filling `stats_by_shard`; return the failed shards."""
    remote = ray.remote(encode_shard).options(num_cpus=1, num_gpus=1 if use_gpu else 0,
                                              max_retries=config.task_retries, retry_exceptions=False)
    max_in_flight = config.max_in_flight or 2 * (gpus if use_gpu else cluster_cpus())
    failed: dict[str, str] = {}
    pending: dict[Any, int] = {}
    queue = list(jobs)
    start, encoded = time.time(), 0
    progress = Progress(TextColumn("[bold]encode"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                        TextColumn("{task.fields[rate]:.1f} samples/s"), TimeElapsedColumn(), console=console,
                        disable=config.quiet)
    with progress:
        bar = progress.add_task("", total=len(jobs) + skipped, completed=skipped, rate=0.0)
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                job = queue.pop(0)
                pending[remote.remote(job)] = job.shard
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                sid = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - one failed shard does not stop the others
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, PipelineError):  # the user's mistake: the same in every shard
                        raise cause from None
                    lines = str(cause or exc).strip().splitlines()
                    result = {"failed": f"{type(cause or exc).__name__}: {lines[-1] if lines else ''}"}
                if "failed" in result:
                    failed[shard_name(sid)] = result["failed"]
                else:
                    stats_by_shard[sid] = result
                    encoded += result["samples"]
                progress.update(bar, advance=1, rate=encoded / max(1e-9, time.time() - start))
    return failed


def encode_shard(job: ShardJob) -> dict[str, Any]:
    """One shard, in a Ray worker: read the input tar, encode its images in batches, write the latent shard.
    Returns the shard's stats, or {"failed": why} when the input tar cannot be read."""
    import torch

    started = time.time()
    try:
        samples = _read_input(job)
    except UnreadableShard as exc:
        return {"failed": str(exc)}
    device = torch.device("cuda" if job.use_gpu else "cpu")
    vae = _cached(job.autoencoder, device)
    clip = _cached(job.clip, device) if job.clip else None
    source = Path(job.tar).name.removesuffix(".tar")
    rows: list[dict[str, Any]] = []
    writer = ShardWriter(ShardOutput(job.output), job.shard, input_digest=job.sha256)
    try:
        keys = list(samples)
        for start in range(0, len(keys), job.batch_size):
            batch = {k: samples[k] for k in keys[start:start + job.batch_size]}
            rows += _encode_batch(job, batch, source, vae, clip, device, writer)
        status = Counter(r["status"] for r in rows)
        stats = {"config_digest": job.identity_digest, "encoding": job.identity, "count": len(rows),
                 "successes": status.get("success", 0), "status": dict(sorted(status.items())),
                 "start_time": started, "end_time": time.time(), "duration": round(time.time() - started, 3)}
        table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
        return writer.close(table, stats)
    except BaseException:
        writer.abort()
        raise


class UnreadableShard(Exception):
    pass


def _read_input(job: ShardJob) -> dict[str, dict[str, bytes]]:
    fs, path = filesystem(job.tar)
    name = Path(job.tar).name
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise UnreadableShard(f"{name}: no such file") from None
    if job.sha256 and hashlib.sha256(data).hexdigest() != job.sha256:
        raise UnreadableShard(f"{name}: sha256 differs from the input manifest (truncated or changed)")
    try:
        return tar_samples(io.BytesIO(data))
    except TAR_ERRORS as exc:
        raise UnreadableShard(f"{name}: not a readable tar ({type(exc).__name__}: {exc})") from None


def _encode_batch(job: ShardJob, batch: dict[str, dict[str, bytes]], source: str, vae: Any, clip: Any,
                  device: Any, writer: ShardWriter) -> list[dict[str, Any]]:
    """Encode one batch of samples and add those that encode to `writer`; return a metadata row per sample."""
    import torch

    rows, pixels, ok = [], [], []
    for key, sample in batch.items():
        caption = sample.get("txt", b"").decode("utf-8", "replace")
        row = {"key": key, "status": "success", "error_message": None, "caption": caption or None,
               "source_shard": source, "width": None, "height": None, "text_len": None}
        rows.append(row)
        image = image_of(sample)
        if not caption.strip():
            row["status"] = "missing_caption"
        elif image is None:
            row["status"] = "missing_image"
        else:
            try:
                array, (row["width"], row["height"]) = image_pixels(image[1], job.image_size)
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad image
                row.update(status="failed_to_decode", error_message=f"{type(exc).__name__}: {exc}")
                continue
            pixels.append(array)
            ok.append(row)
    if not ok:
        return rows
    x = torch.from_numpy(np.stack(pixels)).to(device)
    with torch.inference_mode(), _autocast(device, vae):
        latents = (vae.encode(x).latent_dist.mean.float() * job.scaling_factor).cpu().numpy().astype(np.float16)
    texts = None
    if clip is not None:
        texts, lengths = _text_states(clip, [r["caption"] for r in ok], device)
    for i, row in enumerate(ok):
        if not np.isfinite(latents[i]).all():  # an fp16 overflow, or a broken autoencoder: never a silent NaN
            row.update(status="non_finite_latent", error_message="latent has NaN or infinite values")
            continue
        files = {"latent.npy": _npy(latents[i]), "txt": batch[row["key"]]["txt"]}
        meta = {"key": row["key"], "source_key": row["key"], "source_shard": source,
                "width": row["width"], "height": row["height"]}
        if texts is not None:
            files["text.npy"] = _npy(texts[i])
            meta["text_len"] = row["text_len"] = int(lengths[i])
        files["json"] = json.dumps(meta).encode()
        writer.add(row["key"], files)
    return rows


def image_pixels(data: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An encoded image as the autoencoder takes it (`autoencoder.image_pixels`), and its own (width, height)."""
    from PIL import Image

    from pipelines.train.autoencoder import square_pixels

    image = Image.open(io.BytesIO(data))
    image.load()
    return square_pixels(image, size), image.size


def _text_states(clip: Any, captions: list[str], device: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-token states [N, max_text_len, hidden] (float16) and the token count of each caption."""
    import torch

    tokens = clip.tokenizer(captions, padding="max_length", max_length=clip.max_text_len, truncation=True,
                            return_tensors="pt")
    with torch.inference_mode(), _autocast(device, None):
        states = clip.model.text_model(input_ids=tokens.input_ids.to(device)).last_hidden_state
    return states.float().cpu().numpy().astype(np.float16), tokens.attention_mask.sum(1).numpy()


def _autocast(device: Any, vae: Any) -> Any:
    """bf16 (else fp16) autocast on a GPU; fp32 on the CPU, and for an autoencoder whose config asks for it
    (`force_upcast`: Stable Diffusion's VAEs overflow in half precision, as diffusers' pipelines know)."""
    import torch

    if device.type != "cuda" or (vae is not None and vae.config.get("force_upcast", False)):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


# One model per kind per worker process, kept between the shard tasks it runs (Ray reuses the process).
_MODELS: dict[str, tuple[tuple[str, str], Any]] = {}


def _cached(source: ModelSource, device: Any) -> Any:
    """The model of `source` on `device`, loaded once per worker process from the files the driver shipped."""
    key = (source.identity, str(device))
    held = _MODELS.get(source.kind)
    if held is not None and held[0] == key:
        return held[1]
    _MODELS.pop(source.kind, None)
    folder = tempfile.mkdtemp(prefix=f"pipelines-{source.kind}-")
    try:
        for rel, data in ray.get(source.files).items():
            os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
            Path(folder, rel).write_bytes(data)
        if source.kind == "autoencoder":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_pretrained(folder).eval().to(device)
        else:
            from pipelines.train.clip_model import load_clip

            model = load_clip(folder, str(device))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _MODELS[source.kind] = (key, model)
    return model


# Summary -----------------------------------------------------------------------------------------

def print_summary(console: Console, output: str, result: EncodeResult) -> None:
    shards = len(result.manifest["shards"])
    rate = result.encoded / result.elapsed_s if result.elapsed_s else 0.0
    console.print(f"encode: {result.encoded} samples encoded, {result.rejected} left out (see each shard's "
                  f"parquet) · {shards} shards ({result.written} written, {result.skipped} already done, "
                  f"{len(result.failed_shards)} failed) · {result.elapsed_s:.1f} s · {rate:.1f} samples/s "
                  f"-> {escape(output)}", highlight=False, soft_wrap=True)
