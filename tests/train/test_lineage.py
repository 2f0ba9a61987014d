"""`pipelines lineage` over a real registry (MLflow on SQLite) and real shard folders: crawl -> curate -> encode
-> a diffusion model built on a registered CLIP and autoencoder, and a LoRA adapter on a language model.
(The chain made by the real stages is checked after the end-to-end flow, tests/flows/test_end_to_end.py.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.ingest.crawl import input_lineage
from pipelines.ingest.reader import InputReader
from pipelines.lineage import model_lineage, render
from pipelines.shards import ShardOutput, write_manifest, write_shard


def shard_set(url: str, kind: str, config: dict[str, Any], extra: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    out = ShardOutput(url)
    stats = write_shard(out, 0, [(k, {"txt": k.encode()}) for k in keys], pa.table({"key": keys}),
                        {"shard": 0, "samples": len(keys), "count": len(keys), "status": {"success": len(keys)}})
    return write_manifest(out, kind, config, f"config-of-{kind}", [stats], {"elapsed_s": 1.0}, extra=extra)


def folder(path: Path, *files: str) -> str:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return str(path)


@pytest.fixture
def chain(tmp_path: Path, tracking: MlflowClient) -> dict[str, Any]:
    """Shards as each stage writes its manifest, and models registered as each trainer registers them."""
    from pipelines.train.registry import register_folder, training_run

    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": f"http://example.com/{i}.jpg", "caption": f"photo {i}"}) + "\n"
                            for i in range(5)))
    crawled = str(tmp_path / "crawled")
    crawl = shard_set(crawled, "images", {"input": str(urls)}, {"input": input_lineage(InputReader(str(urls), ["url"]))},
                      ["a", "b", "c", "d"])
    curated = str(tmp_path / "curated")
    curate = shard_set(curated, "images", {"input": crawled, "steps": [{"step": "image_size"},
                                                                         {"step": "exact_dedup", "match": "image"}]},
                       {"run_digest": "r", "input": {"path": crawled, "digest": crawl["digest"], "kind": "images"}},
                       ["a", "b", "c"])
    latents = str(tmp_path / "latents")
    encoded = shard_set(latents, "latents", {"shards": curated},
                        {"input": {"path": curated, "digest": curate["digest"], "kind": "images"},
                         "autoencoder": {"uri": "models:/tiny-ae/1"}, "clip": {"uri": "models:/tiny-clip/1"}},
                        ["a", "b", "c"])
    with training_run("lineage-tests", "clip-run", {}) as clip_run:
        mlflow.log_metrics({"heldout_i2t_recall_at_1": 0.5, "loss": 1.25})
    register_folder("clip", folder(tmp_path / "clip", "config.json", "preprocessor_config.json"), "tiny-clip",
                    run_id=clip_run, metric="heldout_i2t_recall_at_1", value=0.5, lower_is_better=False,
                    lineage={"shards": curated, "shards_digest": curate["digest"]})
    with training_run("lineage-tests", "ae-run", {}) as ae_run:
        mlflow.log_metric("heldout_psnr", 30.0)
    register_folder("autoencoder", folder(tmp_path / "ae", "config.json", "diffusion_pytorch_model.safetensors"),
                    "tiny-ae", run_id=ae_run, metric="heldout_psnr", value=30.0, lower_is_better=False,
                    lineage={"shards": curated, "shards_digest": curate["digest"]})
    with training_run("lineage-tests", "diffusion-run", {}) as run:
        mlflow.log_metrics({"heldout_fd_clip": 12.5, "heldout_clip_score": 0.25, "loss": 0.125})
    register_folder("diffusion", folder(tmp_path / "diffusion", "model_index.json"), "tiny-diffusion", run_id=run,
                    metric="heldout_fd_clip", value=12.5, lower_is_better=True,
                    lineage={"shards": latents, "shards_digest": encoded["digest"],
                             "text_encoder": "models:/tiny-clip/1", "autoencoder": "models:/tiny-ae/1"})
    return {"urls": urls, "crawl": crawl, "curate": curate, "encoded": encoded, "curated": curated,
            "latents": latents}


def test_diffusion_model_reaches_the_crawl_input(chain: dict[str, Any]) -> None:
    node = model_lineage("models:/tiny-diffusion@champion")

    assert node["model"] == "models:/tiny-diffusion/1" and node["kind"] == "diffusion model"
    assert node["aliases"] == ["candidate", "champion"]
    assert node["run"]["name"] == "diffusion-run" and node["run"]["metrics"] == {
        "heldout_clip_score": 0.25, "heldout_fd_clip": 12.5, "loss": 0.125}
    parents = {p["role"]: p for p in node["parents"]}
    assert parents["text encoder"]["model"] == "models:/tiny-clip/1" and parents["text encoder"]["kind"] == "CLIP"
    assert parents["autoencoder"]["model"] == "models:/tiny-ae/1"
    # Each parent's own data reaches the curated shards.
    assert parents["autoencoder"]["data"][0]["digest"] == chain["curate"]["digest"]

    latents = node["data"][0]
    assert latents["url"] == chain["latents"] and latents["matches"] is True
    assert latents["stage"]["name"] == "encode" and latents["stage"]["autoencoder"] == "models:/tiny-ae/1"
    curated = latents["input"]
    assert curated["digest"] == chain["curate"]["digest"] and curated["matches"] is True
    assert curated["stage"] == {"name": "curate", "config_digest": "config-of-images",
                                "steps": ["image_size", "exact_dedup"]}
    crawled = curated["input"]
    assert crawled["digest"] == chain["crawl"]["digest"] and crawled["stage"]["name"] == "crawl"
    # The crawl's input list: what `sha256sum` prints of the file.
    assert crawled["stage"]["input_digest"] == hashlib.sha256(chain["urls"].read_bytes()).hexdigest()
    assert crawled["stage"]["input"] == str(chain["urls"])

    lines = render(node)
    assert [line.split()[0] for line in lines] == [
        "model", "run", "text", "run", "shards", "curate", "from", "crawl", "autoencoder", "run", "shards", "curate",
        "from", "crawl", "shards", "encode", "from", "curate", "from", "crawl"]
    assert lines[-1].endswith(f"sha256 {crawled['stage']['input_digest'][:12]} · config config-of-im")
    assert "heldout_fd_clip 12.5" in lines[1] and "(candidate, champion)" in lines[0]


def test_shards_changed_since_training_are_shown(chain: dict[str, Any]) -> None:
    shard_set(chain["curated"], "images", {"input": "elsewhere", "steps": []},
              {"run_digest": "r2", "input": {"path": "/no/such/shards", "digest": "0" * 64}}, ["x"])

    clip = model_lineage("models:/tiny-clip/1")
    curated = clip["data"][0]
    assert curated["matches"] is False and curated["recorded_digest"] == chain["curate"]["digest"]
    assert "cannot read" in curated["input"]["error"] or "no manifest.json" in curated["input"]["error"]
    lines = render(clip)
    assert f"CHANGED since it was read (then digest {chain['curate']['digest'][:12]})" in lines[2], lines
    assert lines[-1].startswith("from") and "(unchanged)" not in " ".join(lines[2:])
    assert "/no/such/shards" in lines[-1]


def test_cli_prints_json_lines_and_one_line_errors(chain: dict[str, Any]) -> None:
    runner = CliRunner()
    as_json = runner.invoke(app, ["lineage", "models:/tiny-diffusion/1", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == model_lineage("models:/tiny-diffusion/1")

    lines = runner.invoke(app, ["lineage", "models:/tiny-diffusion@champion"])
    assert lines.exit_code == 0 and lines.stdout.splitlines() == render(model_lineage("models:/tiny-diffusion/1"))

    missing = runner.invoke(app, ["lineage", "models:/no-such-model@champion"])
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("error: models:/no-such-model@champion")
    closed = runner.invoke(app, ["lineage", "http://127.0.0.1:9", "--model", "x"])
    assert closed.exit_code == 2 and "cannot ask the endpoint" in closed.stderr


def test_input_digest_of_a_folder_covers_every_file(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_text(json.dumps({"url": f"http://example.com/{i}"}) + "\n")
    recorded = input_lineage(InputReader(str(tmp_path), ["url"]))
    assert [f["sha256"] for f in recorded["files"]] == [
        hashlib.sha256((tmp_path / f"part-{i}.jsonl").read_bytes()).hexdigest() for i in range(3)]
    (tmp_path / "part-1.jsonl").write_text(json.dumps({"url": "http://example.com/other"}) + "\n")
    assert input_lineage(InputReader(str(tmp_path), ["url"]))["digest"] != recorded["digest"]


@pytest.mark.usefixtures("ray_cluster")
def test_examples_file_is_named_through_its_staged_copy(tmp_path: Path) -> None:
    from pipelines.lineage import shards_lineage
    from pipelines.train.sft import prepare_examples

    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                         {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                                for i in range(4)))
    shards = prepare_examples(str(examples), str(tmp_path / "storage"))

    crawl = shards_lineage(shards.url, shards.digest)
    assert crawl["matches"] is True and crawl["samples"] == 4 and crawl["stage"]["name"] == "crawl"
    assert crawl["stage"]["converted_from"] == {"path": str(examples),
                                                "sha256": hashlib.sha256(examples.read_bytes()).hexdigest()}
    staged = Path(crawl["stage"]["input"])
    assert crawl["stage"]["input_digest"] == hashlib.sha256(staged.read_bytes()).hexdigest()


@pytest.mark.parametrize("manifest", [
    {"shards": [], "digest": 5, "kind": ["x"], "config": "a string", "input": {"path": "SELF"}},
    {"shards": [], "digest": "d", "config": {"steps": "not a list"}, "run_digest": 1, "input": {"path": 7}},
    {"shards": [], "digest": "\ud800\u202e\x1b[2J", "input": "not a dict", "converted_from": {"path": ["x"]}},
    {"shards": [], "digest": "d", "kind": "latents", "autoencoder": "not a dict", "clip": 3, "samples": "many"},
])
def test_odd_manifests_print_as_text_and_stop_only_their_hop(tmp_path: Path, manifest: dict[str, Any]) -> None:
    from pipelines.lineage import _render_shards, shards_lineage

    folder = tmp_path / "shards"
    folder.mkdir()
    if manifest.get("input") == {"path": "SELF"}:
        manifest["input"] = {"path": str(folder)}  # a manifest naming itself as its input
    (folder / "manifest.json").write_text(json.dumps(manifest))

    node = shards_lineage(str(folder), "recorded")
    lines = _render_shards(node, "shards", 0)
    text = json.dumps(node) + "\n".join(lines)
    text.encode("utf-8")  # printable: no lone surrogates
    assert "\x1b" not in text and "\u202e" not in text
    assert lines[0].startswith("shards") and "CHANGED since it was read" in lines[0]
