"""`pipelines pretrain --kind clip` end to end on CPU: real Ray Train workers, real DeepSpeed (gloo), real MLflow on a
SQLite file, image shards written by the crawler's shard writer: coloured shapes captioned by what they show."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from pipelines.ingest.images import METADATA_SCHEMA
from pipelines.ingest.shards import metadata_table, shard_stats
from pipelines.shards import ShardOutput, write_manifest, write_shard
from pipelines.train.clip import (ClipPretrainConfig, ImageCaptionStream, image_tensor, pretrain_clip, read_image_tar,
                                   stream_batches)
from pipelines.train.data import open_shards

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 220, 30)}
SHAPES = ["circle", "square", "triangle"]
CAPTIONS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
PIL_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 48, fmt: str = "JPEG") -> bytes:
    """An image (JPEG unless `fmt` says otherwise) of one shape at a random place and size on a grey background."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 160, 3)))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    pen, fill = ImageDraw.Draw(image), COLOURS[colour]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    out = io.BytesIO()
    image.save(out, fmt, quality=90)
    return out.getvalue()


def write_shape_shards(url: str, count: int, per_shard: int, seed: int = 0, formats: tuple[str, ...] = ("jpg",)) -> None:
    """`count` captioned shapes as image shards at `url`, through the crawler's own writer; the images in
    `formats` in turn (the crawl writes jpg, webp or png)."""
    rng = np.random.default_rng(seed)
    out = ShardOutput(url)
    stats = []
    for sid, start in enumerate(range(0, count, per_shard)):
        keys = [f"{sid:05d}{i:04d}" for i in range(min(per_shard, count - start))]
        captions = [CAPTIONS[int(rng.integers(len(CAPTIONS)))] for _ in keys]
        exts = [formats[(start + i) % len(formats)] for i in range(len(keys))]
        samples = [(k, {ext: draw(*c.split()[1:], rng, fmt=PIL_FORMATS[ext]), "txt": c.encode(), "json": b"{}"})
                   for k, c, ext in zip(keys, captions, exts, strict=True)]
        metas = [{"key": k, "caption": c, "status": "success"} for k, c in zip(keys, captions, strict=True)]
        stats.append(write_shard(out, sid, samples, metadata_table(metas, METADATA_SCHEMA),
                                 shard_stats("digest", metas, time.time())))
    write_manifest(out, "images", {}, "digest", stats, {})


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("shapes") / "shards")
    write_shape_shards(url, count=960, per_shard=240)
    return url


def tiny_config(tmp_path: Path, shards: str, **engine: Any) -> ClipPretrainConfig:
    return ClipPretrainConfig.model_validate({
        "model": {"preset": "tiny", "image_size": 32, "patch_size": 8, "max_text_len": 8},
        "tokenizer": {"vocab_size": 300},
        "data": {"shards": shards, "shuffle_buffer": 64, "heldout_percent": 10, "crop_scale": 0.7},
        "optim": {"lr": 2e-3, "warmup_steps": 10},
        "engine": {"workers": 2, "zero_stage": 2, "micro_batch": 32, "max_steps": 150, "checkpoint_every": 50,
                   "eval_batches": 4, **engine},
        "registry": {"experiment": "test-clip", "model_name": "tiny-clip"},
        "storage": str(tmp_path / "runs"), "quiet": True})


def test_stream_is_deterministic_resumable_and_augments(shards: str, tmp_path: Path) -> None:
    from pipelines.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(CAPTIONS, 300, str(tmp_path / "tok"))
    options = dict(image_size=32, max_text_len=8, micro_batch=8, world_size=1, seed=3, shuffle_buffer=16,
                   heldout_percent=10)
    stream = ImageCaptionStream(open_shards(shards), tokenizer, rank=0, **options)
    batches = iter(stream)
    first = [next(batches) for _ in range(3)]
    state = stream.state_dict()
    after = [next(batches) for _ in range(2)]

    again = ImageCaptionStream(open_shards(shards), tokenizer, rank=0, **options)
    again.load_state_dict(state)
    resumed = iter(again)
    for expected in after:
        for a, b in zip(next(resumed), expected, strict=True):
            assert (a == b).all()
    pixels, ids, mask = first[0]
    assert pixels.shape == (8, 3, 32, 32) and ids.shape == mask.shape == (8, 8)
    data = read_image_tar(open_shards(shards).tars[0])[0][1]
    plain = image_tensor(data, 32)
    crops = [image_tensor(data, 32, np.random.default_rng(seed), 0.5, True) for seed in (1, 1, 2)]
    assert plain.shape == crops[0].shape == (3, 32, 32)
    assert (crops[0] == crops[1]).all() and not (crops[0] == crops[2]).all() and not (crops[0] == plain).all()


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_processes_give_the_streams_batches_and_resume_position(shards: str, tmp_path: Path,
                                                                        workers: int) -> None:
    """Batches made in 1 or 2 loader processes are the stream's own, in its order, across an epoch's end; the
    state after k batches handed out is the in-thread stream's after k (the loaders read ahead, the state
    follows what was handed out) and resumes on batch k+1 exactly."""
    from pipelines.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(CAPTIONS, 300, str(tmp_path / "tok"))

    def stream() -> ImageCaptionStream:
        return ImageCaptionStream(open_shards(shards), tokenizer, image_size=32, max_text_len=8, micro_batch=32,
                                  rank=0, world_size=1, seed=3, shuffle_buffer=48, heldout_percent=10)

    direct, k = stream(), 17
    batches = iter(direct)
    expected = [next(batches) for _ in range(k)]
    state_after_k = direct.state_dict()
    expected += [next(batches) for _ in range(18)]
    assert direct.state_dict()["position"]["epoch"] == 1  # ~864 training pairs: 27 batches an epoch

    loaded = stream()
    batches = stream_batches(loaded, workers)
    for want in expected[:k]:
        for got, w in zip(next(batches), want, strict=True):
            assert torch.equal(got, w)
    assert loaded.state_dict() == state_after_k
    resumed = stream()
    resumed.load_state_dict(loaded.state_dict())
    again = stream_batches(resumed, workers)
    for want in expected[k:]:
        for got, w in zip(next(again), want, strict=True):
            assert torch.equal(got, w)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_learn_shapes_register_and_embed(tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    from pipelines.train.clip_model import load_clip

    result = pretrain_clip(tiny_config(tmp_path, shards))

    assert not result.stopped and result.steps == 150
    run = tracking.get_run(result.mlflow_run_id)
    metrics = run.data.metrics
    assert {"loss", "samples_per_s", "temperature", "heldout_t2i_recall_at_5"} <= set(metrics)
    assert metrics["heldout_captions"] == len(CAPTIONS)
    assert metrics["heldout_i2t_recall_at_1"] >= 3 / len(CAPTIONS), metrics  # chance: 1/12
    assert metrics["heldout_i2t_recall_at_5"] > metrics["heldout_i2t_recall_at_1"] - 1e-9
    assert result.registered.champion
    assert str(tracking.get_model_version_by_alias("tiny-clip", "candidate").version) == "1"

    bundle = load_clip("models:/tiny-clip@champion")
    rng = np.random.default_rng(99)
    truth = [CAPTIONS[i % len(CAPTIONS)] for i in range(48)]
    images = bundle.embed_images([draw(*c.split()[1:], rng) for c in truth])
    texts = bundle.embed_texts(CAPTIONS)
    assert images.shape == (48, 64) and np.allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-4)
    hits = np.mean([CAPTIONS[j] == c for j, c in zip((images @ texts.T).argmax(1), truth, strict=True)])
    assert hits >= 3 / len(CAPTIONS), hits


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_stop_and_resume_equals_a_straight_run(tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    """The straight run decodes in the training thread, the stopped one in 2 loader processes (which read ahead
    of the step where it stops), the resumed one in 1: the same losses step for step."""
    def config(path: Path, loader_workers: int, **engine: Any) -> ClipPretrainConfig:
        c = tiny_config(path, shards, workers=1, max_steps=12, checkpoint_every=4, **engine)
        c.registry.register_model = False
        c.data.loader_workers = loader_workers
        return c

    straight = pretrain_clip(config(tmp_path / "a", 0).model_copy(update={"run_name": "straight"}))
    stopped = pretrain_clip(config(tmp_path / "b", 2, stop_after=6).model_copy(update={"run_name": "interrupted"}))
    assert stopped.stopped and stopped.steps == 6
    resumed = pretrain_clip(config(tmp_path / "b", 1).model_copy(update={"resume": "interrupted"}))

    assert resumed.mlflow_run_id == stopped.mlflow_run_id and resumed.steps == 12
    a = {m.step: m.value for m in tracking.get_metric_history(straight.mlflow_run_id, "loss")}
    b = {m.step: m.value for m in tracking.get_metric_history(resumed.mlflow_run_id, "loss")}
    assert sorted(a) == sorted(b) == list(range(1, 13))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-5)
    assert resumed.metrics["heldout_i2t_recall_at_1"] == pytest.approx(straight.metrics["heldout_i2t_recall_at_1"])


def test_shipped_config_loads_and_partial_sections_keep_clip_defaults(tmp_path: Path) -> None:
    from pipelines.config import load_config

    shipped = load_config(ClipPretrainConfig, Path(__file__).parents[2] / "configs/pretrain/clip-tiny.yaml")
    assert shipped.model.image_size == 64 and shipped.registry.model_name == "clip-tiny"
    (tmp_path / "c.yaml").write_text("engine:\n  workers: 2\n")
    config = load_config(ClipPretrainConfig, tmp_path / "c.yaml")
    assert config.engine.workers == 2 and config.engine.micro_batch == 64 and config.optim.beta2 == 0.98


SHIPPED = str(Path(__file__).parents[2] / "configs/pretrain/clip-tiny.yaml")


@pytest.mark.parametrize("command", [["pretrain", "--kind", "clip"], ["pretrain-clip"], ["pretrain", "-c", SHIPPED]])
@pytest.mark.parametrize("args, expected", [
    (["--zero-stage", "3"], "zero_stage 3"),
    (["--preset", "huge"], "model.preset"),
    ([], "--shards"),
    (["--seq-len", "64"], "--seq-len is not an option of a clip config"),
])
def test_bad_config_is_one_line_before_any_worker(tmp_path: Path, command: list[str], args: list[str],
                                                  expected: str) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    run = CliRunner().invoke(app, [*command, "--storage", str(tmp_path / "runs"), "--quiet", *args])
    if command == ["pretrain-clip"] and args == ["--seq-len", "64"]:  # a command with the CLIP options only
        assert run.exit_code == 2 and "No such option: --seq-len" in run.output
        return

    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr


@pytest.mark.slow
def test_flow_pretrain_with_a_clip_config_runs_the_clip_stage_and_caches_it(tmp_path: Path, shards: str) -> None:
    """`pipelines flow pretrain -c clip-tiny.yaml`: the `kind: clip` config runs the `pretrain-clip` flow (a
    Prefect task on the ephemeral API, its own embedded defaults under a fresh PIPELINES_HOME); the same
    shards and config again come from Prefect's cache, with no new model version."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "PIPELINES_", "RAY_SERVE_")) and k != "RAY_ADDRESS"}
    env["PIPELINES_HOME"] = str(tmp_path / "home")
    sets = {"data.shards": shards, "model.image_size": 32, "model.max_text_len": 8, "tokenizer.vocab_size": 300,
            "data.heldout_percent": 10, "engine.max_steps": 6, "engine.checkpoint_every": 6,
            "engine.micro_batch": 16, "engine.eval_batches": 2, "registry.model_name": "flow-clip"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    def run() -> dict[str, Any]:
        summary = tmp_path / "summary.json"
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "flow", "pretrain", "-c", SHIPPED, *args,
                               "--summary-json", str(summary)], env=env, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).parents[2])
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "pretrain-clip" in proc.stdout  # the summary table's stage
        return json.loads(summary.read_text())

    first = run()
    assert first["stage"] == "pretrain-clip" and first["state"] == "Completed", first
    assert first["result"]["model_uri"] == "models:/flow-clip/1" and first["result"]["steps"] == 6
    assert 0 <= first["result"]["heldout_i2t_recall_at_1"] <= 1
    second = run()
    assert second["state"] == "Cached" and second["result"]["model_uri"] == "models:/flow-clip/1"
    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='flow-clip'")] == ["1"]


@pytest.fixture(scope="module")
def webp_png_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("webp-png") / "shards")
    write_shape_shards(url, count=96, per_shard=48, seed=1, formats=("webp", "png"))
    return url


def test_webp_and_png_shards_feed_the_stream(webp_png_shards: str, tmp_path: Path) -> None:
    from pipelines.train.tokenizer import train_tokenizer

    shards = open_shards(webp_png_shards)
    pairs = [p for tar in shards.tars for p in read_image_tar(tar)]
    assert len(pairs) == 96  # every sample, whichever format its image is in
    assert {Image.open(io.BytesIO(image)).format for _, image, _ in pairs} == {"WEBP", "PNG"}
    tokenizer = train_tokenizer(CAPTIONS, 300, str(tmp_path / "tok"))
    stream = ImageCaptionStream(shards, tokenizer, image_size=32, max_text_len=8, micro_batch=8, world_size=1,
                                rank=0, seed=0, shuffle_buffer=16, heldout_percent=10)
    pixels, ids, mask = next(iter(stream))
    assert pixels.shape == (8, 3, 32, 32) and ids.shape == mask.shape == (8, 8)


@pytest.mark.usefixtures("ray_cluster")
def test_clip_trains_on_webp_and_png_shards(tmp_path: Path, webp_png_shards: str, tracking: MlflowClient) -> None:
    config = tiny_config(tmp_path, webp_png_shards, workers=1, zero_stage=0, micro_batch=16, max_steps=3,
                         checkpoint_every=3, eval_batches=1)
    config.registry.register_model = False
    result = pretrain_clip(config)
    assert not result.stopped and result.steps == 3
    assert np.isfinite(tracking.get_run(result.mlflow_run_id).data.metrics["loss"])
