"""`pipelines pretrain --kind autoencoder` end to end on CPU: real Ray Train workers, real DeepSpeed (gloo), real
MLflow on a SQLite file, on the coloured-shape image shards of the CLIP tests (32x32 pixels)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.train.autoencoder import (AutoencoderPretrainConfig, ImageStream, downsample_factor, heldout_images,
                                         image_pixels, pretrain_autoencoder)
from pipelines.train.data import open_shards
from tests.train.test_clip import write_shape_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("shapes") / "shards")
    write_shape_shards(url, count=480, per_shard=120)
    return url


def tiny_config(tmp_path: Path, shards: str, loss: dict[str, Any] | None = None,
                **engine: Any) -> AutoencoderPretrainConfig:
    return AutoencoderPretrainConfig.model_validate({
        "model": {"preset": "tiny", "image_size": 32},
        "loss": {"disc_start": 10, "disc_layers": 2, "disc_channels": 16, **(loss or {})},
        "data": {"shards": shards, "shuffle_buffer": 64, "heldout_percent": 10},
        "engine": {"workers": 1, "micro_batch": 16, "max_steps": 20, "checkpoint_every": 50, "eval_batches": 3,
                   **engine},
        "registry": {"experiment": "test-autoencoder", "model_name": "tiny-autoencoder"},
        "storage": str(tmp_path / "runs"), "quiet": True})


def blur_psnr(images: list[bytes], factor: int) -> float:
    """The baseline of the same compression: each image shrunk by `factor` (box filter) and enlarged back
    (bicubic); its PSNR on [0, 1] pixels."""
    from pipelines.train.image_eval import psnr

    originals, blurred = [], []
    for data in images:
        pixels = (image_pixels(data, 32).transpose(1, 2, 0) + 1) / 2
        small = Image.fromarray((pixels * 255).round().astype(np.uint8)).resize((32 // factor,) * 2, Image.BOX)
        originals.append(pixels)
        blurred.append(np.asarray(small.resize((32, 32), Image.BICUBIC), np.float32) / 255)
    return psnr(np.stack(originals), np.stack(blurred))


def metric_history(tracking: MlflowClient, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in tracking.get_metric_history(run_id, name)}


def test_stream_is_deterministic_resumable_and_leaves_out_heldout(shards: str) -> None:
    options = dict(image_size=32, micro_batch=8, world_size=1, seed=3, shuffle_buffer=16, heldout_percent=10)
    stream = ImageStream(open_shards(shards), rank=0, **options)
    batches = iter(stream)
    first = [next(batches) for _ in range(3)]
    state = stream.state_dict()
    after = [next(batches) for _ in range(2)]
    again = ImageStream(open_shards(shards), rank=0, **options)
    again.load_state_dict(state)
    resumed = iter(again)
    for expected in after:
        assert (next(resumed) == expected).all()
    assert first[0].shape == (8, 3, 32, 32) and first[0].dtype.is_floating_point
    assert -1 <= first[0].min() < 0 < first[0].max() <= 1

    heldout = {data for data in heldout_images(open_shards(shards), 10, 1000)}
    assert 20 < len(heldout) < 80  # about 10% of 480
    seen = [image for _ in range(60) for image in next(batches)]  # more than an epoch of training images
    held_pixels = {image_pixels(data, 32).tobytes() for data in heldout}
    flipped = {image_pixels(data, 32, flip=True).tobytes() for data in heldout}
    assert not any(image.numpy().tobytes() in held_pixels | flipped for image in seen)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_trains_registers_with_scaling_factor_and_switches_the_gan_on(tmp_path: Path, shards: str,
                                                                      tracking: MlflowClient) -> None:
    from diffusers import AutoencoderKL

    from pipelines.train.registry import registered_folder

    # 800 steps of 8 images (reconstruction alone), then 20 with the discriminator: it is switched on and
    # measured, but a GAN this young only adds noise to the reconstructions.
    config = tiny_config(tmp_path, shards, {"disc_start": 780}, max_steps=800, micro_batch=8, checkpoint_every=800,
                         eval_batches=8)
    result = pretrain_autoencoder(config)

    assert not result.stopped and result.steps == 800
    metrics = tracking.get_run(result.mlflow_run_id).data.metrics
    assert {"loss", "rec_loss", "kl_loss", "g_loss", "d_loss", "adaptive_weight", "samples_per_s",
            "heldout_l1", "latent_std", "scaling_factor"} <= set(metrics)
    # The discriminator (and with it the adversarial term) starts after disc_start steps, not before.
    d_loss = metric_history(tracking, result.mlflow_run_id, "d_loss")
    weights = metric_history(tracking, result.mlflow_run_id, "adaptive_weight")
    assert sorted(d_loss) == sorted(weights) == list(range(781, 801))
    assert sorted(metric_history(tracking, result.mlflow_run_id, "rec_loss")) == list(range(1, 801))
    assert all(math.isfinite(w) and w > 0 for w in weights.values()), weights

    # Held-out reconstructions clearly beat a blur of the same compression (f2: 16x16x4 latents against a
    # 16x16x3 thumbnail; 34.4 dB on these held-out shapes; the autoencoder reaches about 36.8).
    images = heldout_images(open_shards(shards), 10, 64)
    blur = blur_psnr(images, downsample_factor(config.model))
    assert metrics["heldout_images"] == len(images)
    assert metrics["heldout_psnr"] > blur + 1, (metrics["heldout_psnr"], blur)

    assert result.registered.champion and result.registered.uri == "models:/tiny-autoencoder/1"
    version = tracking.get_model_version("tiny-autoencoder", "1")
    assert version.tags["pipelines.kind"] == "autoencoder" and version.tags["downsample_factor"] == "2"
    assert version.tags["latent_channels"] == "4" and version.tags["image_size"] == "32"
    vae = AutoencoderKL.from_pretrained(registered_folder("autoencoder", "models:/tiny-autoencoder@champion"))
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["latent_std"], rel=1e-5)
    assert float(version.tags["scaling_factor"]) == pytest.approx(vae.config.scaling_factor, rel=1e-5)
    from pipelines.train.image_eval import psnr

    x = torch_pixels(images)
    import torch

    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
        again = vae.decode(latents).sample.clamp(-1, 1)
    assert latents.shape == (len(images), 4, 16, 16)
    exported = psnr((x.numpy() + 1) / 2, (again.numpy() + 1) / 2)
    assert exported == pytest.approx(metrics["heldout_psnr"], abs=0.01)  # the export is the trained model


def torch_pixels(images: list[bytes]) -> Any:
    import torch

    return torch.from_numpy(np.stack([image_pixels(data, 32) for data in images]))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_stop_and_resume_equals_a_straight_run(tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    def config(path: Path, **engine: Any) -> AutoencoderPretrainConfig:
        c = tiny_config(path, shards, {"disc_start": 4}, max_steps=10, checkpoint_every=3, **engine)
        c.registry.register_model = False
        return c

    straight = pretrain_autoencoder(config(tmp_path / "a").model_copy(update={"run_name": "straight"}))
    stopped = pretrain_autoencoder(config(tmp_path / "b", stop_after=6).model_copy(update={"run_name": "interrupted"}))
    assert stopped.stopped and stopped.steps == 6
    resumed = pretrain_autoencoder(config(tmp_path / "b").model_copy(update={"resume": "interrupted"}))

    assert resumed.mlflow_run_id == stopped.mlflow_run_id and resumed.steps == 10
    for name, steps in (("loss", range(1, 11)), ("d_loss", range(5, 11)), ("adaptive_weight", range(5, 11))):
        a = metric_history(tracking, straight.mlflow_run_id, name)
        b = metric_history(tracking, resumed.mlflow_run_id, name)
        assert sorted(a) == sorted(b) == list(steps), name
        np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-5, err_msg=name)
    assert resumed.metrics["heldout_psnr"] == pytest.approx(straight.metrics["heldout_psnr"], abs=1e-4)


@pytest.mark.usefixtures("ray_cluster")
def test_heldout_fd_clip_with_a_registered_clip(tmp_path: Path, shards: str, tracking: MlflowClient,
                                                 tiny_clip: Path) -> None:
    from pipelines.train.registry import register_clip, training_run

    with training_run("autoencoder-tests", None, {}) as run_id:
        pass
    register_clip(str(tiny_clip), "tiny-clip", run_id=run_id, metric="recall_at_1", value=1.0)
    config = tiny_config(tmp_path, shards, {"disc_start": 100}, max_steps=4, eval_batches=2)
    config.evaluation.eval_clip = "models:/tiny-clip@champion"
    config.registry.register_model = False
    result = pretrain_autoencoder(config)

    logged = tracking.get_run(result.mlflow_run_id).data.metrics
    assert "heldout_fd_clip" in logged and math.isfinite(logged["heldout_fd_clip"]) and logged["heldout_fd_clip"] > 0
    assert logged["heldout_fd_clip"] == pytest.approx(result.metrics["heldout_fd_clip"])


def test_shipped_config_loads() -> None:
    from pipelines.config import load_config

    shipped = load_config(AutoencoderPretrainConfig,
                          Path(__file__).parents[2] / "configs/pretrain/autoencoder-tiny.yaml")
    assert shipped.kind == "autoencoder" and shipped.model.preset == "tiny"
    assert shipped.registry.model_name == "autoencoder-tiny" and shipped.registry.experiment == "pretrain-autoencoder"


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    import json

    from pipelines.ingest.text import TextCrawlConfig, crawl_text

    root = tmp_path_factory.mktemp("text")
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"document {i}."}) + "\n"
                                            for i in range(10)))
    crawl_text(TextCrawlConfig(input=str(root / "docs.jsonl"), output=str(root / "shards"), quiet=True))
    return str(root / "shards")


@pytest.mark.parametrize("args, expected", [
    (["--preset", "huge"], "model.preset"),
    (["--image-size", "33"], "image_size 33 is not a multiple of the tiny autoencoder's downsampling factor 2"),
    (["--preset", "sd", "--image-size", "36"], "downsampling factor 8"),
    (["--zero-stage", "3"], "zero_stage 3"),
    (["--eval-clip", "/nowhere/clip"], "eval_clip"),
    (["text-shards"], "text shards; pretrain-autoencoder trains on images shards"),
    (["--seq-len", "64"], "--seq-len is not an option of a autoencoder config"),
])
def test_bad_config_is_one_line_before_any_worker(tmp_path: Path, shards: str, text_shards: str, args: list[str],
                                                  expected: str) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    given = ["--shards", text_shards] if args == ["text-shards"] else ["--shards", shards, *args]
    run = CliRunner().invoke(app, ["pretrain", "--kind", "autoencoder", "--storage", str(tmp_path / "runs"), "--quiet",
                                   *given])
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was started
