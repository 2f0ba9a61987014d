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
