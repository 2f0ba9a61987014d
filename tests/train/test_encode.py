"""`pipelines encode`: image shards -> latent shards, with a registered autoencoder, on real Ray and MLflow."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.errors import PipelineError
from pipelines.ingest.images import METADATA_SCHEMA
from pipelines.ingest.shards import metadata_table, shard_stats
from pipelines.shards import ShardOutput, read_tar, write_manifest, write_shard
from pipelines.train.encode import EncodeConfig, encode
from tests.train.test_clip import CAPTIONS, draw

pytestmark = pytest.mark.usefixtures("ray_cluster")

SCALING_FACTOR = 0.7
PER_SHARD = 8
BROKEN_KEY, UNCAPTIONED_KEY, WIDE_KEY = "000000002", "000000005", "000000007"  # all in shard 0


def wide_png() -> bytes:
    """A 64x40 PNG (the square draws are 48x48): resized by its shorter side, then centre-cropped."""
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_image_shards(url: str, shards: int = 2) -> dict[str, str]:
    """Captioned shapes as image shards, through the crawl's writer; in shard 0 an image that does not decode,
    a sample without a caption and a wide PNG. Returns key -> caption of every captioned sample."""
    rng = np.random.default_rng(0)
    out, stats, captions = ShardOutput(url), [], {}
    for sid in range(shards):
        samples, metas = [], []
        for i in range(PER_SHARD):
            key = f"{sid:05d}{i:04d}"
            caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
            files: dict[str, bytes] = {"jpg": draw(*caption.split()[1:], rng), "txt": caption.encode(), "json": b"{}"}
            if key == BROKEN_KEY:
                files["jpg"] = b"\xff\xd8 this is not a JPEG"
            if key == WIDE_KEY:
                files = {"png": wide_png(), "txt": files["txt"], "json": b"{}"}
            if key == UNCAPTIONED_KEY:
                del files["txt"]
            else:
                captions[key] = caption
            samples.append((key, files))
            metas.append({"key": key, "caption": caption, "status": "success"})
        stats.append(write_shard(out, sid, samples, metadata_table(metas, METADATA_SCHEMA),
                                 shard_stats("digest", metas, time.time())))
    write_manifest(out, "images", {}, "digest", stats, {})
    return captions


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    url = str(tmp_path_factory.mktemp("images") / "shards")
    return url, write_image_shards(url)


def build_vae(folder: Path, seed: int) -> Path:
    """A tiny untrained AutoencoderKL for 32x32 images (f2, 4 latent channels), saved with its scaling factor."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=32, scaling_factor=SCALING_FACTOR)
    vae.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("vae")
    return [build_vae(root / f"ae{seed}", seed) for seed in (0, 1)]


def register(kind: str, folder: Path, name: str) -> int:
    from pipelines.train.registry import register_folder, training_run

    with training_run("t", None, {}) as run_id:
        return register_folder(kind, str(folder), name, run_id=run_id, metric="heldout_psnr", value=20.0,
                               lower_is_better=False).version


def reference_latent(folder: Path, image: bytes) -> np.ndarray:
    """What the autoencoder makes of a square image here, in this process: the posterior mean x scaling_factor."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).eval()
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((32, 32), Image.BICUBIC), np.float32)
    x = torch.from_numpy((pixels / 127.5 - 1).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor)[0].numpy()


def config(shards: str, output: Path, autoencoder: str, **more: Any) -> EncodeConfig:
    return EncodeConfig(shards=shards, output=str(output), autoencoder=autoencoder, batch_size=3, quiet=True, **more)


def output_samples(output: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(output.glob("*.tar")):
        samples.update(read_tar(str(tar)))
    return samples


def test_latents_are_the_autoencoders_and_bad_samples_are_recorded(
        tmp_path: Path, image_shards: tuple[str, dict[str, str]], vae_folders: list[Path],
        tracking: MlflowClient) -> None:
    import webdataset as wds

    shards, captions = image_shards
    assert register("autoencoder", vae_folders[0], "ae") == 1
    out = tmp_path / "latents"

    result = encode(config(shards, out, "models:/ae@champion"))

    assert result.ok and result.written == 2 and result.skipped == 0
    samples = output_samples(out)
    expected = set(captions) - {BROKEN_KEY}
    assert set(samples) == expected
    inputs = {**read_tar(f"{shards}/00000.tar"), **read_tar(f"{shards}/00001.tar")}
    for key in expected:
        sample = samples[key]
        assert sample["txt"] == inputs[key]["txt"]
        latent = np.load(io.BytesIO(sample["latent.npy"]))
        assert latent.dtype == np.float16 and latent.shape == (4, 16, 16)
        meta = json.loads(sample["json"])
        assert meta["source_key"] == key and meta["source_shard"] == key[:5]
        if key == WIDE_KEY:
            assert (meta["width"], meta["height"]) == (64, 40)
            continue
        assert (meta["width"], meta["height"]) == (48, 48)
        want = reference_latent(vae_folders[0], inputs[key]["jpg"])
        np.testing.assert_allclose(latent.astype(np.float32), want, rtol=2e-3, atol=2e-3)

    # The bad samples: recorded with their reason in shard 0's parquet, counted in its stats and the manifest.
    rows = {r["key"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    assert len(rows) == PER_SHARD
    assert rows[BROKEN_KEY]["status"] == "failed_to_decode" and rows[BROKEN_KEY]["error_message"]
    assert rows[UNCAPTIONED_KEY]["status"] == "missing_caption"
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["status"] == {"success": PER_SHARD - 2, "failed_to_decode": 1, "missing_caption": 1}
    assert result.encoded == 2 * PER_SHARD - 2 and result.rejected == 2

    manifest = json.loads((out / "manifest.json").read_text())
    input_manifest = json.loads(Path(shards, "manifest.json").read_text())
    assert manifest["kind"] == "latents" and manifest["samples"] == 2 * PER_SHARD - 2
    assert manifest["input"]["digest"] == input_manifest["digest"]
    assert manifest["input"]["path"] == str(Path(shards).absolute())
    ae = manifest["autoencoder"]
    assert (ae["uri"], ae["name"], ae["version"]) == ("models:/ae@champion", "ae", 1)
    assert (ae["scaling_factor"], ae["latent_channels"], ae["downsample_factor"], ae["image_size"]) == \
        (SCALING_FACTOR, 4, 2, 32)
    assert "clip" not in manifest

    # webdataset reads the shards as they are, with the latent under its two-part extension.
    dataset = wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)
    read = {s["__key__"]: s for s in dataset}
    assert set(read) == expected
    assert np.load(io.BytesIO(read[WIDE_KEY]["latent.npy"])).shape == (4, 16, 16)


def test_a_rerun_skips_done_shards_and_refuses_other_settings(
        tmp_path: Path, image_shards: tuple[str, dict[str, str]], vae_folders: list[Path],
        tracking: MlflowClient) -> None:
    shards, _ = image_shards
    register("autoencoder", vae_folders[0], "ae")
    out = tmp_path / "latents"
    encode(config(shards, out, "models:/ae/1"))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("0*")}

    again = encode(config(shards, out, "models:/ae/1"))
    assert (again.written, again.skipped, again.encoded) == (0, 2, 0) and again.ok
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*")} == before

    # Another version of the autoencoder (the alias moved), or another image size: refused, nothing touched.
    assert register("autoencoder", vae_folders[1], "ae") == 2
    with pytest.raises(PipelineError, match=r"shard 00000 was encoded with autoencoder models:/ae/1, not models:/ae/2"):
        encode(config(shards, out, "models:/ae@candidate"))
    with pytest.raises(PipelineError, match="was encoded with image size 32, not 16"):
        encode(config(shards, out, "models:/ae/1", image_size=16))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*")} == before
    with pytest.raises(PipelineError, match="--use-gpu asked for, and this machine's Ray has no GPU"):
        encode(config(shards, tmp_path / "gpu", "models:/ae/1", use_gpu=True))

    over = encode(config(shards, out, "models:/ae@candidate", overwrite=True))
    assert over.written == 2 and over.manifest["autoencoder"]["version"] == 2
    latent = np.load(io.BytesIO(output_samples(out)["000000000"]["latent.npy"]))
    want = reference_latent(vae_folders[1], read_tar(f"{shards}/00000.tar")["000000000"]["jpg"])
    np.testing.assert_allclose(latent.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_cli_encodes_with_a_local_folder_and_an_unreadable_shard_fails_alone(
        tmp_path: Path, image_shards: tuple[str, dict[str, str]], vae_folders: list[Path]) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(image_shards[0], shards)
    args = ["encode", "--shards", str(shards), "--output", str(tmp_path / "out"), "--autoencoder",
            str(vae_folders[0]), "--batch-size", "4"]

    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    summary = run.stderr.strip().splitlines()[-1]
    assert "14 samples encoded, 2 left out" in summary and "samples/s" in summary and str(tmp_path / "out") in summary
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["autoencoder"]["folder"] == str(vae_folders[0]) and manifest["autoencoder"]["version"] is None

    # Shard 1's tar cut short: it fails with a one-line reason, shard 0 is done, the command exits non-zero.
    tar = shards / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    run = CliRunner().invoke(app, args[:4] + [str(tmp_path / "out2")] + args[5:] + ["--quiet"])
    assert run.exit_code == 1, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 shard(s) failed: 00001 (00001.tar: sha256 differs" in lines[0], run.stderr
    manifest = json.loads((tmp_path / "out2" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["00000"]
    assert manifest["stats"]["failed_shards"].keys() == {"00001"}
    assert sorted(p.name for p in (tmp_path / "out2").iterdir() if not p.name.startswith(".")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "manifest.json"]


@pytest.mark.parametrize("autoencoder, expected", [
    ("models:/missing@champion", "models:/missing@champion: no such registered model version"),
    ("/no/such/folder", "/no/such/folder: not a registered model (models:/NAME@ALIAS) nor a model folder"),
])
def test_cli_refuses_a_missing_autoencoder_in_one_line(
        tmp_path: Path, image_shards: tuple[str, dict[str, str]], tracking: MlflowClient,
        autoencoder: str, expected: str) -> None:
    run = CliRunner().invoke(app, ["encode", "--shards", image_shards[0], "--output", str(tmp_path / "out"),
                                   "--autoencoder", autoencoder])

    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    assert "Traceback" not in run.output and not (tmp_path / "out").exists()


def test_clip_text_states_are_stored_per_caption(
        tmp_path: Path, image_shards: tuple[str, dict[str, str]], vae_folders: list[Path], tiny_clip: Path,
        tracking: MlflowClient) -> None:
    import torch

    from pipelines.train.clip_model import load_clip
    from pipelines.train.registry import register_clip, training_run

    shards, captions = image_shards
    register("autoencoder", vae_folders[0], "ae")
    with training_run("t", None, {}) as run_id:
        register_clip(str(tiny_clip), "clip", run_id=run_id, metric="heldout_recall_at_1", value=0.5)
    out = tmp_path / "latents"

    result = encode(config(shards, out, "models:/ae/1", clip="models:/clip@champion"))

    assert result.ok and result.manifest["clip"]["name"] == "clip" and result.manifest["clip"]["version"] == 1
    bundle = load_clip(str(tiny_clip), "cpu")
    samples = output_samples(out)
    for key in ("000000000", "000010003"):
        states = np.load(io.BytesIO(samples[key]["text.npy"]))
        assert states.dtype == np.float16 and states.shape == (bundle.max_text_len, 64)
        tokens = bundle.tokenizer([captions[key]], padding="max_length", max_length=bundle.max_text_len,
                                  truncation=True, return_tensors="pt")
        with torch.no_grad():
            want = bundle.model.text_model(input_ids=tokens.input_ids).last_hidden_state[0].numpy()
        np.testing.assert_allclose(states.astype(np.float32), want, rtol=2e-3, atol=2e-3)
        assert json.loads(samples[key]["json"])["text_len"] == len(captions[key].split())
    # A rerun with another CLIP (none) is another encoding.
    with pytest.raises(PipelineError, match="was encoded with CLIP models:/clip/1, not None"):
        encode(config(shards, out, "models:/ae/1"))


def test_shipped_config_loads() -> None:
    from pipelines.config import load_config

    shipped = Path(__file__).parents[2] / "configs/encode/default.yaml"
    loaded = load_config(EncodeConfig, shipped, {("shards",): "in", ("output",): "out"})
    assert loaded.autoencoder.startswith("models:/") and loaded.clip is None and loaded.image_size is None
