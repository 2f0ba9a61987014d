"""Every stage on `s3://`, against a real S3 API on loopback (moto's server mode, `s3` in tests/conftest.py).

The pieces no Ray worker touches run in this process: shards uploaded whole, the URL-list reader, the
training stream, digests and downloads. The stages run as a user runs them, as `pipelines` commands in
their own processes, which start their own local Ray (whose workers must find the bucket through the
same environment): crawl -> curate -> pretrain, reading from and writing to the bucket only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.errors import PipelineError
from pipelines.ingest.reader import InputReader
from pipelines.ingest.shards import metadata_table, shard_stats
from pipelines.shards import ShardOutput, owned, write_manifest, write_shard
from pipelines.train.data import TokenStream, iter_texts, make_loader, open_shards
from pipelines.train.pretrain import local_copy
from pipelines.train.tokenizer import train_tokenizer
from tests.conftest import Bucket, WebServer

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string())])
SUBJECTS = ["the cat", "a dog", "my neighbour", "the old farmer", "a small bird", "the teacher"]
VERBS = ["sees", "likes", "follows", "paints", "feeds", "visits"]
OBJECTS = ["the river", "a red apple", "the garden", "an open window", "the village"]


def sentences(i: int) -> str:
    """Document `i`: a few sentences from a tiny grammar (easy to learn), the same for the same `i`."""
    rng = random.Random(i)
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}.".capitalize()
                    for _ in range(rng.randint(3, 7)))


def write_text_shards(url: str, texts: list[str], per_shard: int) -> dict[str, Any]:
    """`texts` as shards at `url` through the crawler's own writer (no Ray needed)."""
    out = ShardOutput(url)
    stats = []
    for sid, start in enumerate(range(0, len(texts), per_shard)):
        part = texts[start:start + per_shard]
        keys = [f"{sid:05d}{i:03d}" for i in range(len(part))]
        metas = [{"key": k, "status": "success"} for k in keys]
        samples = [(k, {"txt": t.encode(), "json": b"{}"}) for k, t in zip(keys, part, strict=True)]
        stats.append(write_shard(out, sid, samples, metadata_table(metas, SCHEMA),
                                 shard_stats("digest", metas, time.time())))
    return write_manifest(out, "text", {}, "digest", stats, {})


# -- in this process ------------------------------------------------------------------------------

def test_shards_are_uploaded_whole_and_only_complete_ones_count_as_done(s3: Bucket, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where uploads are staged

    manifest = write_text_shards(s3.url("shards"), [f"document {i}" for i in range(5)], per_shard=3)

    assert set(s3.objects()) == {"shards/00000.tar", "shards/00000.parquet", "shards/00000_stats.json",
                                 "shards/00001.tar", "shards/00001.parquet", "shards/00001_stats.json",
                                 "shards/manifest.json"}
    assert json.loads(s3.read("shards/manifest.json")) == manifest
    for shard in manifest["shards"]:
        assert hashlib.sha256(s3.read(f"shards/{shard['tar']}")).hexdigest() == shard["sha256"]
    assert list(staging.iterdir()) == []  # every staged file and folder removed once uploaded
    out = ShardOutput(s3.url("shards"))
    assert out.done_shards() == {0, 1}
    assert {k: v["txt"] for k, v in out.read_tar("00001.tar").items()} == {"00001000": b"document 3",
                                                                          "00001001": b"document 4"}
    # Another process deletes a stats file: the same object does not answer from a cached listing.
    s3.client.delete_object(Bucket=s3.name, Key="shards/00001_stats.json")
    assert out.done_shards() == {0}

    s3.put("a-file", b"x")
    with pytest.raises(PipelineError, match="a-file: cannot use as output folder"):
        ShardOutput(s3.url("a-file"))


def test_output_in_a_bucket_is_owned_by_one_run_and_a_dead_runs_lock_expires(s3: Bucket) -> None:
    out = ShardOutput(s3.url("out"))
    s3.put("out/00002.tar", b"published, then its writer was killed")
    with owned(out):
        assert json.loads(s3.read("out/.lock"))["pid"] == os.getpid()
        assert "out/00002.tar" not in s3.objects()  # a shard without stats is no shard
        with pytest.raises(PipelineError) as info, ShardOutput(s3.url("out")).lock():
            pass
        assert str(info.value).startswith(f"{s3.url('out')}: in use by another run (pid {os.getpid()} on ")
    assert "out/.lock" not in s3.objects()  # released at the end of the run
    # A run killed while holding it never renews its lock: once expired, the next run takes it.
    dead = {"run": "dead", "pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00Z"}
    s3.put("out/.lock", json.dumps({**dead, "expires": time.time() + 60}).encode())
    with pytest.raises(PipelineError, match="in use by another run \\(pid 1 on elsewhere"):
        out.lock().__enter__()
    s3.put("out/.lock", json.dumps({**dead, "expires": time.time() - 1}).encode())
    with out.lock():
        assert json.loads(s3.read("out/.lock"))["run"] != "dead"


def test_url_lists_stream_from_a_bucket_in_file_order(s3: Bucket) -> None:
    s3.put("lists/a.jsonl", b"".join(json.dumps({"url": f"http://a/{i}", "caption": f"a{i}"}).encode() + b"\n"
                                     for i in range(3)))
    s3.put("lists/b.csv", b"url,caption\nhttp://b/0,b0\nhttp://b/1,b1\n")
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": ["http://c/0"], "caption": ["c0"]}), buf)
    s3.put("lists/c.parquet", buf.getvalue())
    s3.put("lists/notes.md", b"not a list")

    reader = InputReader(s3.url("lists"), ["url", "caption"])

    assert reader.files == [s3.url("lists/a.jsonl"), s3.url("lists/b.csv"), s3.url("lists/c.parquet")]
    assert [[r["url"] for r in shard] for shard in reader.shards(4)] == [
        ["http://a/0", "http://a/1", "http://a/2", "http://b/0"], ["http://b/1", "http://c/0"]]
    with pytest.raises(PipelineError, match="no such file or folder"):
        InputReader(s3.url("lists/missing.jsonl"), ["url"])


def test_training_stream_from_a_bucket_is_the_stream_from_disk(s3: Bucket, tmp_path: Path) -> None:
    texts = [sentences(i) for i in range(60)]
    write_text_shards(str(tmp_path / "shards"), texts, per_shard=20)
    write_text_shards(s3.url("shards"), texts, per_shard=20)
    train_tokenizer(texts, 300, str(tmp_path / "tokenizer"))

    def batches(url: str) -> list[torch.Tensor]:
        # Two dataloader worker processes, each opening the bucket itself.
        stream = TokenStream(open_shards(url), str(tmp_path / "tokenizer"), seq_len=16, micro_batch=2, rank=0,
                             world_size=1, seed=3, shuffle_buffer=8, heldout_percent=10, num_workers=2)
        return list(islice(make_loader(stream), 12))

    remote = open_shards(s3.url("shards"))
    assert remote.tars == [s3.url(f"shards/0000{i}.tar") for i in range(3)]
    assert [t for _, t in iter_texts(remote, 0, "train")] == texts
    for got, want in zip(batches(s3.url("shards")), batches(str(tmp_path / "shards")), strict=True):
        assert torch.equal(got, want)


def test_digests_and_local_copies_read_the_bucket(s3: Bucket, tmp_path: Path) -> None:
    from pipelines.flows import content_digest

    manifest = write_text_shards(s3.url("shards"), ["one", "two"], per_shard=1)
    s3.put("model/config.json", b"{}")
    s3.put("model/sub/weights.bin", b"\0" * 10)

    assert content_digest(s3.url("shards")) == manifest["digest"]
    local = _download(s3.url("model"), tmp_path / "model")
    assert content_digest(s3.url("model")) == content_digest(str(local))
    assert content_digest(s3.url("model/config.json")) == content_digest(str(local / "config.json"))
    with pytest.raises(PipelineError, match="no such file or folder"):
        content_digest(s3.url("nothing"))


def _download(url: str, to: Path) -> Path:
    with local_copy(url) as folder:
        files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        assert files == ["config.json", "sub/weights.bin"]
        to.mkdir()
        for name in files:
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            (to / name).write_bytes((Path(folder) / name).read_bytes())
    assert not Path(folder).exists()  # the temporary download is gone
    return to


# -- the stages, as commands ----------------------------------------------------------------------

# `pipelines ARGS` for each ARGS in turn, in one process (one local Ray start for all: on 2 cores each
# costs 10-20 s); stops at the first that fails, with its output.
RUN_COMMANDS = textwrap.dedent("""
    import json, sys, traceback
    from typer.testing import CliRunner
    from pipelines.cli import app
    for args in json.loads(sys.argv[1]):
        result = CliRunner().invoke(app, args)
        print(result.output, flush=True)
        if result.exit_code != 0:
            if result.exc_info and not isinstance(result.exception, SystemExit):
                traceback.print_exception(*result.exc_info)
            sys.exit(f"pipelines {' '.join(args)}: exit code {result.exit_code}")
""")


def env_for(tmp_path: Path) -> dict[str, str]:
    """This process's environment (the bucket's settings included) less what tests or Prefect put in it;
    MLflow on a SQLite file of the test's own. No RAY_ADDRESS: the commands start their own local Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "PIPELINES_"))
           and k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    return env | {"PIPELINES_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
                  "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def pipelines(tmp_path: Path, *commands: list[str]) -> str:
    """Run the `pipelines` commands in a process of their own, in an empty working folder (nothing may
    land there); return their output."""
    proc = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], cwd=tmp_path / "cwd",
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
def test_crawl_curate_pretrain_register_from_and_to_a_bucket(s3: Bucket, web: WebServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from pipelines.train.registry import load_registered

    (tmp_path / "cwd").mkdir()
    images = [{"url": web.url(f"/img/{i}.jpg"), "caption": f"photo {i}"} for i in range(10)]
    images.append({"url": web.url("/missing"), "caption": "gone"})
    s3.put("lists/images.jsonl", "".join(json.dumps(r) + "\n" for r in images).encode())
    docs = [{"id": f"d{i}", "text": sentences(i)} for i in range(300)]
    docs += [{"id": f"copy{i}", "text": sentences(i)} for i in range(20)]  # exact duplicates
    docs += [{"id": f"short{i}", "text": "Too short."} for i in range(5)]
    s3.put("lists/corpus.jsonl", "".join(json.dumps(r) + "\n" for r in docs).encode())
    (tmp_path / "curate.yaml").write_text("steps:\n  - step: length\n    min_words: 5\n"
                                          "  - step: exact_dedup\n    match: text\n")

    # Crawl images from a URL list in the bucket into shards in the bucket, then again (a resume with
    # every shard done); text from a corpus in the bucket; curate it bucket to bucket, then again.
    crawl_images = ["crawl", "images", "--input", s3.url("lists/images.jsonl"), "--output", s3.url("shards/images"),
                    "--shard-size", "4", "--allow-private-network", "--quiet"]
    curate = ["curate", "--input", s3.url("shards/text"), "--output", s3.url("curated/text"),
              "--config", str(tmp_path / "curate.yaml")]
    output = pipelines(tmp_path, crawl_images, crawl_images,
                       ["crawl", "text", "--input", s3.url("lists/corpus.jsonl"), "--output", s3.url("shards/text"),
                        "--shard-size", "100", "--quiet"],
                       [*curate, "--quiet"], curate)

    manifest = json.loads(s3.read("shards/images/manifest.json"))
    assert manifest["samples"] == 10 and manifest["stats"]["status"] == {"success": 10, "failed_to_download": 1}
    assert len(manifest["shards"]) == 3
    for shard in manifest["shards"]:
        assert hashlib.sha256(s3.read(f"shards/images/{shard['tar']}")).hexdigest() == shard["sha256"]
    rows = pq.read_table(io.BytesIO(s3.read("shards/images/00002.parquet"))).to_pylist()
    assert [r["status"] for r in rows] == ["success", "success", "failed_to_download"]
    # (the manifest is the second run's: it found every shard done and fetched nothing)
    assert manifest["stats"]["shards_skipped"] == 3 and manifest["stats"]["shards_written"] == 0
    assert web.hits_under("/img/") == 10

    curated = json.loads(s3.read("curated/text/manifest.json"))
    assert curated["samples"] == 300
    assert curated["input"]["digest"] == json.loads(s3.read("shards/text/manifest.json"))["digest"]
    for shard in curated["shards"]:
        assert hashlib.sha256(s3.read(f"curated/text/{shard['tar']}")).hexdigest() == shard["sha256"]
    removed = pq.read_table(io.BytesIO(s3.read("curated/text/removed.parquet"))).to_pylist()
    assert sorted({(r["step"], r["reason"]) for r in removed}) == [("exact_dedup", "exact_duplicate"),
                                                                  ("length", "too_few_words")]
    assert sum(r["step"] == "exact_dedup" for r in removed) == 20 and len(removed) == 25
    assert json.loads(s3.read("curated/text/stats.json"))["output"]["samples"] == 300
    assert b"Curation report" in s3.read("curated/text/report.html")
    assert any(k.startswith("curated/text/_work/") for k in s3.objects("curated/text/"))
    assert "up to date" in output

    # Pretrain on the curated shards: the run, its checkpoints and the exported model in the bucket.
    pipelines(tmp_path, ["pretrain", "--config", str(ROOT / "configs/pretrain/lm-tiny.yaml"),
                         "--shards", s3.url("curated/text"), "--storage", s3.url("runs"), "--run-name", "lm",
                         "--workers", "1", "--max-steps", "6", "--checkpoint-every", "3", "--vocab-size", "400",
                         "--seq-len", "64", "--micro-batch", "4", "--heldout-percent", "10", "--eval-batches", "2",
                         "--quiet"])
    run = s3.objects("runs/lm/")
    for key in ("run.json", "tokenizer/tokenizer.json", "step-0000003/state.json", "step-0000006/state.json",
                "step-0000006/data-rank0.json", "model/config.json", "model/model.safetensors",
                "model/tokenizer.json"):
        assert f"runs/lm/{key}" in run, key
    assert json.loads(s3.read("runs/lm/step-0000006/state.json"))["step"] == 6
    assert not [k for k in s3.objects() if ".tmp" in k]  # nothing left under a temporary name
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) in ([], ["mlartifacts"])  # nothing written here

    # Registered from the bucket: MLflow's version is the model in the bucket, and it loads.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias("lm-tiny", "candidate")
    assert str(version.version) == "1" and version.tags["lineage.shards"] == s3.url("curated/text")
    assert version.tags["lineage.source_shards"] == s3.url("shards/text")
    registered, tokenizer = load_registered("models:/lm-tiny@candidate")
    with local_copy(s3.url("runs/lm/model")) as model_dir:
        exported = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(registered.state_dict()[name], tensor, rtol=0, atol=0)
    assert tokenizer("The cat sees the river")["input_ids"]
