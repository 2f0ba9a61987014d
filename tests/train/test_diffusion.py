"""`pipelines pretrain --kind diffusion` on CPU: real Ray Train workers, DeepSpeed (gloo), MLflow on SQLite, a tiny
CLIP and a tiny autoencoder trained here on drawn shapes ("a red circle"), latent shards written by
`pipelines encode`."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines.train.diffusion import DiffusionPretrainConfig, Ema, pretrain_diffusion
from tests.tiny_clip import COLOURS, PAIRS, jpeg, samples

CAPTIONS = [f"a {c} {s}" for c, s in PAIRS]


def write_image_shards(url: str, count: int, per_shard: int, seed: int = 0) -> None:
    """`count` captioned shapes (tests/tiny_clip.py's drawings, 64 px) as image shards, through the crawl's writer."""
    from pipelines.ingest.images import METADATA_SCHEMA
    from pipelines.ingest.shards import metadata_table, shard_stats
    from pipelines.shards import ShardOutput, write_manifest, write_shard

    pairs = samples(count, seed)
    out = ShardOutput(url)
    stats = []
    for sid, start in enumerate(range(0, count, per_shard)):
        part = pairs[start:start + per_shard]
        keys = [f"{sid:05d}{i:04d}" for i in range(len(part))]
        files = [(k, {"jpg": jpeg(im), "txt": c.encode(), "json": b"{}"}) for k, (im, c) in zip(keys, part, strict=True)]
        metas = [{"key": k, "caption": c, "status": "success"} for k, (_, c) in zip(keys, part, strict=True)]
        stats.append(write_shard(out, sid, files, metadata_table(metas, METADATA_SCHEMA),
                                 shard_stats("digest", metas, time.time())))
    write_manifest(out, "images", {}, "digest", stats, {})


def dominant_colour(image: Any) -> str | None:
    """The drawn colour nearest to the mean of the image's most saturated pixels (the shape, not the grey)."""
    pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
    saturation = pixels.max(1) - pixels.min(1)
    if saturation.max() < 60:  # no shape drawn
        return None
    vivid = pixels[saturation >= 0.6 * saturation.max()]
    mean = vivid.mean(0)
    return min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> dict[str, Path]:
    from tests.tiny_autoencoder import train_tiny_autoencoder

    return {"clip": tiny_clip, "autoencoder": train_tiny_autoencoder(tmp_path_factory.mktemp("ae") / "ae")}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("shapes") / "images")
    write_image_shards(url, 480, 120)
    return url


@pytest.fixture
def registered(tracking: MlflowClient, models: dict[str, Path]) -> dict[str, str]:
    from pipelines.train.registry import register_clip, register_folder, training_run

    with training_run("diffusion-tests", None, {}) as run_id:
        pass
    register_clip(str(models["clip"]), "tiny-clip", run_id=run_id, metric="recall_at_1", value=1.0)
    register_folder("autoencoder", str(models["autoencoder"]), "tiny-ae", run_id=run_id, metric="heldout_psnr",
                    value=20.0, lower_is_better=False)
    return {"clip": "models:/tiny-clip@champion", "autoencoder": "models:/tiny-ae@champion"}


def encode(image_shards: str, out: str, autoencoder: str) -> str:
    from pipelines.train.encode import EncodeConfig, encode as run_encode

    run_encode(EncodeConfig(shards=image_shards, output=out, autoencoder=autoencoder, quiet=True))
    return out


def tiny_config(tmp_path: Path, shards: str, text_encoder: str, **engine: Any) -> DiffusionPretrainConfig:
    return DiffusionPretrainConfig.model_validate({
        "storage": str(tmp_path / "runs"), "quiet": True,
        "data": {"shards": shards, "shuffle_buffer": 64, "heldout_percent": 10},
        "conditioning": {"text_encoder": text_encoder},
        "optim": {"lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "sampling": {"eval_samples": 24, "sample_steps": 10, "guidance_scale": 3.0},
        "objective": {"ema_decay": 0.99},
        "engine": {"workers": 1, "micro_batch": 32, "max_steps": 300, "checkpoint_every": 100, **engine},
        "registry": {"model_name": "tiny-diffusion"}})


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_trained_model_draws_the_captions_colour(tmp_path: Path, image_shards: str, registered: dict[str, str],
                                                 tracking: MlflowClient) -> None:
    from pipelines.train.diffusion import load_diffusion

    latents = encode(image_shards, str(tmp_path / "latents"), registered["autoencoder"])
    result = pretrain_diffusion(tiny_config(tmp_path, latents, registered["clip"]))

    assert not result.stopped and result.steps == 300 and result.registered.champion
    metrics = tracking.get_run(result.mlflow_run_id).data.metrics
    assert {"loss", "samples_per_s", "heldout_fd_clip", "heldout_clip_score"} <= set(metrics)
    version = tracking.get_model_version("tiny-diffusion", str(result.registered.version))
    assert version.tags["lineage.autoencoder"] == "models:/tiny-ae/1"
    assert version.tags["lineage.text_encoder"] == "models:/tiny-clip/1"
    artifacts = [a.path for a in tracking.list_artifacts(result.mlflow_run_id, "samples")]
    assert artifacts == ["samples/step-0000300.png"]

    pipe = load_diffusion("models:/tiny-diffusion@champion", device="cpu")
    prompts = [f"a {c} {s}" for c, s in PAIRS] * 2
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0,
                  generator=[__import__("torch").Generator().manual_seed(i) for i in range(len(prompts))]).images
    hits = [dominant_colour(im) == p.split()[1] for im, p in zip(images, prompts, strict=True)]
    assert np.mean(hits) >= 0.8, hits

    # The same pipeline with an untrained denoiser does not (chance: 1 in 4).
    from pipelines.train.diffusion import build_unet

    pipe.unet = build_unet(DiffusionPretrainConfig().model, 4, pipe.unet.config.sample_size,
                           pipe.unet.config.cross_attention_dim, seed=0)
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0,
                  generator=[__import__("torch").Generator().manual_seed(i) for i in range(len(prompts))]).images
    untrained = [dominant_colour(im) == p.split()[1] for im, p in zip(images, prompts, strict=True)]
    assert np.mean(untrained) < 0.5, untrained


def short_config(tmp_path: Path, shards: str, text_encoder: str, name: str, **engine: Any) -> DiffusionPretrainConfig:
    """Two workers under ZeRO-2, a few steps, a tiny final evaluation."""
    config = tiny_config(tmp_path, shards, text_encoder, **{"workers": 2, "zero_stage": 2, "micro_batch": 8,
                                                            "checkpoint_every": 4, **engine})
    config.sampling.eval_samples, config.sampling.sample_steps = 4, 2
    config.objective.ema_decay = 0.5  # a short run's EMA still differs clearly from the weights
    config.registry.register_model = False
    return config.model_copy(update={"run_name": name})


def checkpoint_file(runs: Path, step: int, name: str) -> Path:
    found = [p for p in runs.rglob(name) if f"step-{step:07d}" in str(p)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_stop_and_resume_equals_a_straight_run_with_two_workers_and_zero2(
        tmp_path: Path, image_shards: str, registered: dict[str, str], tracking: MlflowClient) -> None:
    from safetensors.torch import load_file

    latents = encode(image_shards, str(tmp_path / "latents"), registered["autoencoder"])
    straight = pretrain_diffusion(short_config(tmp_path / "a", latents, registered["clip"], "straight", max_steps=10))
    stopped = pretrain_diffusion(short_config(tmp_path / "b", latents, registered["clip"], "cut", max_steps=10,
                                              stop_after=5))
    assert stopped.stopped and stopped.steps == 5
    resumed = pretrain_diffusion(short_config(tmp_path / "b", latents, registered["clip"], "cut", max_steps=10)
                                 .model_copy(update={"resume": "cut"}))

    assert resumed.steps == 10 and resumed.mlflow_run_id == stopped.mlflow_run_id
    a = {m.step: m.value for m in tracking.get_metric_history(straight.mlflow_run_id, "loss")}
    b = {m.step: m.value for m in tracking.get_metric_history(resumed.mlflow_run_id, "loss")}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    assert [m.value for m in tracking.get_metric_history(resumed.mlflow_run_id, "restored_from_step")] == [5]
    # The EMA was saved with the step-5 checkpoint, restored, and went on as if never stopped.
    ema_a = load_file(checkpoint_file(tmp_path / "a" / "runs", 10, "ema.safetensors"))
    ema_b = load_file(checkpoint_file(tmp_path / "b" / "runs", 10, "ema.safetensors"))
    assert ema_a.keys() == ema_b.keys()
    assert max(float((ema_a[k] - ema_b[k]).abs().max()) for k in ema_a) <= 1e-5
    assert straight.metrics["heldout_fd_clip"] == pytest.approx(resumed.metrics["heldout_fd_clip"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_killed_worker_restarts_from_its_checkpoint(tmp_path: Path, image_shards: str, registered: dict[str, str],
                                                   tracking: MlflowClient) -> None:
    import os
    import signal
    import threading

    import psutil

    from tests.train.test_pretrain import train_worker_pids

    latents = encode(image_shards, str(tmp_path / "latents"), registered["autoencoder"])
    config = short_config(tmp_path, latents, registered["clip"], "killed", max_steps=60, checkpoint_every=5,
                          max_failures=1)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(pretrain_diffusion(config)))
    started = time.time() - 1
    thread.start()
    deadline = time.monotonic() + 300
    # Kill a worker once Ray Train has committed the step-5 checkpoint (both ranks reported it).
    while time.monotonic() < deadline and thread.is_alive() and not any(
            "step-0000005" in p.read_text() for p in (tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.05)
    found = train_worker_pids(started)
    pids = [pid for pid in found if psutil.Process(pid).ppid() not in found]  # not their loader processes
    assert len(pids) == 2 and thread.is_alive(), "training finished before the kill"
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=600)

    assert results and results[0].steps == 60 and not results[0].stopped
    run = tracking.get_run(results[0].mlflow_run_id)
    restored = [m.value for m in tracking.get_metric_history(run.info.run_id, "restored_from_step")]
    assert len(restored) == 1 and restored[0] >= 5 and restored[0] % 5 == 0  # once, from a checkpoint
    losses = {m.step for m in tracking.get_metric_history(run.info.run_id, "loss")}
    assert losses == set(range(1, 61)) and run.info.status == "FINISHED"


def test_ema_follows_its_formula() -> None:
    import torch

    module = torch.nn.Linear(3, 2)
    ema = Ema(module, decay=0.9, warmup=True)
    expected = {n: p.detach().clone() for n, p in module.named_parameters()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update(module, step)
        d = min(0.9, (1 + step) / (10 + step))
        for n, p in module.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, expected", [
    (["--preset", "huge"], "model.preset"),
    (["--zero-stage", "3"], "zero_stage 3"),
    (["--text-encoder", "models:/no-such-clip@champion"], "no-such-clip"),
    (["--text-encoder", "models:/tiny-ae@champion"], "is an autoencoder, not a CLIP model"),
    ([], "encode them first"),  # image shards without an autoencoder to encode them
])
def test_bad_config_is_one_line_before_any_worker(tmp_path: Path, image_shards: str, registered: dict[str, str],
                                                  args: list[str], expected: str) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    run = CliRunner().invoke(app, ["pretrain", "--kind", "diffusion", "--shards", image_shards, "--storage",
                                   str(tmp_path / "runs"), "--text-encoder", registered["clip"], "--quiet", *args])

    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_shipped_config_loads() -> None:
    from pipelines.config import load_config

    config = load_config(DiffusionPretrainConfig, Path(__file__).parents[2] / "configs/pretrain/diffusion-tiny.yaml")
    assert config.kind == "diffusion" and config.model.preset == "tiny" and config.engine.max_steps == 500


def test_unreadable_latents_are_skipped_alone(tmp_path: Path) -> None:
    """A latent that is not a finite [C, H, W] float array (garbage, a pickle, NaN, wrong rank) drops that sample,
    not the tar."""
    import pickle

    from pipelines.shards import ShardOutput, write_shard
    from pipelines.train.diffusion import read_latent_tar

    def npy(array: np.ndarray) -> bytes:
        out = io.BytesIO()
        np.save(out, array, allow_pickle=True)
        return out.getvalue()

    good = np.zeros((4, 8, 8), np.float16)
    bad = [b"not numpy", npy(np.array([{"a": 1}], dtype=object)), npy(np.full((4, 8, 8), np.nan, np.float16)),
           npy(np.zeros((8, 8), np.float32)), npy(np.zeros((4, 8, 8), np.int64)), pickle.dumps(good), b""]
    files = [(f"good{i}", {"latent.npy": npy(good), "txt": b"a red circle"}) for i in range(3)]
    files += [(f"bad{i}", {"latent.npy": data, "txt": b"a red circle"}) for i, data in enumerate(bad)]
    import pyarrow as pa

    write_shard(ShardOutput(str(tmp_path)), 0, files, pa.table({"key": [k for k, _ in files]}),
                {"shard": 0, "samples": len(files), "count": len(files)})

    rows = read_latent_tar(str(tmp_path / "00000.tar"))
    assert [key for key, *_ in rows] == ["good0", "good1", "good2"]
    # Latents of another shape than the run's (a tar encoded at another size) are skipped too.
    write_shard(ShardOutput(str(tmp_path)), 1, [("small", {"latent.npy": npy(good), "txt": b"a red circle"}),
                                                ("large", {"latent.npy": npy(np.zeros((4, 16, 16), np.float16)),
                                                           "txt": b"a red circle"})],
                pa.table({"key": ["small", "large"]}), {"shard": 1, "samples": 2, "count": 2})
    assert [key for key, *_ in read_latent_tar(str(tmp_path / "00001.tar"), (4, 8, 8))] == ["small"]
    assert [key for key, *_ in read_latent_tar(str(tmp_path / "00001.tar"))] == ["small", "large"]


def test_loader_process_gives_the_streams_batches_and_resume_position(tmp_path: Path) -> None:
    """Batches made in the loader process are the stream's own, in its order, and the state after k batches
    handed out resumes on batch k+1 exactly (the loader reads ahead; the state follows what was handed out)."""
    import pyarrow as pa
    import torch

    from pipelines.shards import ShardOutput, write_manifest, write_shard
    from pipelines.train.data import open_shards
    from pipelines.train.clip import BatchLoader
    from pipelines.train.diffusion import DiffusionStream

    rng = np.random.default_rng(0)
    out = ShardOutput(str(tmp_path))
    stats = []
    for sid in range(3):
        files = []
        for i in range(40):
            buffer = io.BytesIO()
            np.save(buffer, rng.standard_normal((4, 8, 8)).astype(np.float16))
            files.append((f"{sid:05d}{i:04d}", {"latent.npy": buffer.getvalue(), "txt": CAPTIONS[i % 12].encode()}))
        stats.append(write_shard(out, sid, files, pa.table({"key": [k for k, _ in files]}),
                                 {"shard": sid, "samples": len(files), "count": len(files)}))
    write_manifest(out, "latents", {}, "digest", stats, {})
    shards = open_shards(str(tmp_path))

    def stream() -> DiffusionStream:
        return DiffusionStream(shards, latents=True, image_size=16, latent_shape=(4, 8, 8), caption_dropout=0.3,
                               micro_batch=8, rank=0, world_size=1, seed=3, shuffle_buffer=32, heldout_percent=10)

    direct = iter(stream())
    expected = [next(direct) for _ in range(30)]  # past an epoch: 108 training samples, 13.5 batches each
    loaded = stream()
    batches = iter(BatchLoader(loaded))
    for x, captions in expected[:17]:
        got_x, got_captions = next(batches)
        assert torch.equal(got_x, x) and got_captions == captions
    resumed = stream()
    resumed.load_state_dict(loaded.state_dict())
    again = iter(BatchLoader(resumed))
    for x, captions in expected[17:]:
        got_x, got_captions = next(again)
        assert torch.equal(got_x, x) and got_captions == captions
