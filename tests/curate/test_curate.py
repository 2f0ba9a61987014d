"""`curate` end to end on crawled shards: dedup, outputs, reruns and the cache, corrupt shards, bad
configs, steps from outside the package (by path and as an installed plugin), and image shards."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import load_config
from pipelines.curate.registry import available_steps, find_step
from pipelines.curate.run import CurateConfig, curate
from pipelines.curate.step import Step, StepParams, reasons, threshold
from pipelines.errors import PipelineError
from pipelines.ingest.images import ImageCrawlConfig, crawl_images
from pipelines.shards import ShardOutput
from pipelines.ingest.text import TextCrawlConfig, crawl_text
from tests.conftest import Photo, WebServer
from tests.curate.loading import assert_loadable

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = Path(__file__).with_name("plugin_steps")
DEDUP = [{"step": "exact_dedup", "match": "text"},
         {"step": "minhash_dedup", "ngram": 5, "bands": 25, "rows": 2, "jaccard": 0.5}]


# -- the corpus -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    shards: Path  # the crawl's output
    texts: dict[str, str]  # id -> text, in input order
    original_of: dict[str, str]  # id of a planted copy -> id of the document it copies
    exact: set[str]  # ids of the exact copies (case, punctuation and spacing changed)
    near: set[str]  # ids of the near copies (three words changed)
    key_of: dict[str, str]  # id -> sample key

    @property
    def originals(self) -> set[str]:
        return set(self.texts) - set(self.original_of)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """~270 documents in 4 shards: 240 unrelated ones (80 to 110 random words of a 4900-word
    vocabulary), exact copies of 15 of them and near copies of 15 others (one with two), each copy
    placed after its original, most of them in another shard."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(2024)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = [a + b for a in syllables for b in syllables]
    texts = {f"d{i:03d}": " ".join(rng.choice(vocab, rng.integers(80, 111))) for i in range(240)}
    placed = [(float(i), doc) for i, doc in enumerate(texts)]
    copies: dict[str, tuple[str, str]] = {}
    for i in range(15):  # exact copies: equal once normalised
        original = f"d{i * 7:03d}"
        copies[f"{original}-exact"] = (original, texts[original].upper().replace(" ", ",  ", 5) + "!")
    for i in range(15):  # near copies: three words changed, J ~ 0.6-0.75 with 5-word shingles
        original = f"d{i * 7 + 3:03d}"
        for n in range(2 if i == 0 else 1):
            words = texts[original].split()
            for pos in (10, 40, 70):
                words[pos + n] = f"changed{n}{pos}"
            copies[f"{original}-near{n}"] = (original, " ".join(words))
    for doc, (original, _) in copies.items():
        placed.append((int(original[1:]) + rng.integers(1, 120) + 0.5, doc))
    all_texts = {**texts, **{doc: text for doc, (_, text) in copies.items()}}
    order = [doc for _, doc in sorted(placed)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": d, "text": all_texts[d]}) + "\n" for d in order))
    shards = root / "shards"
    crawl_text(TextCrawlConfig(input=str(root / "corpus.jsonl"), output=str(shards), shard_size=70, quiet=True))
    key_of = {r["id"]: r["key"] for r in read_rows(shards)}
    return Corpus(shards, {d: all_texts[d] for d in order}, {d: o for d, (o, _) in copies.items()},
                  {d for d in copies if "exact" in d}, {d for d in copies if "near" in d}, key_of)


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """Every row of every shard's parquet, in shard order."""
    return [r for p in sorted(folder.glob("[0-9]*.parquet")) for r in pq.read_table(p).to_pylist()]


def kept_ids(out: Path) -> list[str]:
    return [r["id"] for r in read_rows(out)]


def removed(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "removed.parquet").to_pylist()


def snapshot(folder: Path) -> dict[str, int]:
    """mtime of every file under `folder` (the work cache included; not the lock file, which names the run
    holding the output)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def check_step_counts(stats: dict[str, Any], samples_in: int) -> None:
    """Each step keeps what it did not drop and hands it to the next; the last one's kept is the output."""
    expected_in = samples_in
    for s in stats["steps"]:
        assert s["in"] == expected_in, s
        assert s["in"] - sum(s["dropped"].values()) == s["kept"], s
        expected_in = s["kept"]
    assert stats["output"]["samples"] == expected_in


def dedup_config(corpus: Corpus, out: Path, steps: list[dict[str, Any]] | None = None, **options: Any) -> CurateConfig:
    return CurateConfig(input=str(corpus.shards), output=str(out), steps=steps or DEDUP, quiet=True, **options)


# -- dedup end to end -----------------------------------------------------------------------------
def test_exact_and_near_copies_are_removed_and_everything_else_kept(tmp_path: Path, corpus: Corpus) -> None:
    out = tmp_path / "out"

    result = curate(dedup_config(corpus, out))

    assert result.ok and not result.up_to_date
    assert sorted(kept_ids(out)) == sorted(corpus.originals)
    gone = {r["key"]: r for r in removed(out)}
    id_of = {key: doc for doc, key in corpus.key_of.items()}
    assert sorted(id_of[k] for k in gone) == sorted(corpus.original_of)
    for key, r in gone.items():
        doc = id_of[key]
        assert (r["step"], r["reason"]) == (("exact_dedup", "exact_duplicate") if doc in corpus.exact
                                            else ("minhash_dedup", "near_duplicate")), doc
        assert r["kept_key"] == corpus.key_of[corpus.original_of[doc]] and r["cluster_id"], r
        if doc in corpus.exact:
            assert r["similarity"] == 1.0
        else:  # three words of 80 to 110 changed: 15 of the 5-word shingles differ
            assert 0.5 <= r["similarity"] < 0.8
        assert r["chars"] == len(corpus.texts[doc])

    # The shards read back by webdataset (as training reads them) and by our own reader.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest and manifest["kind"] == "text"
    tars = sorted(out.glob("*.tar"))
    assert [s["tar"] for s in manifest["shards"]] == [p.name for p in tars] and len(tars) == 4
    samples = list(wds.WebDataset([str(p) for p in tars], shardshuffle=False, empty_check=False))
    assert sorted(s["__key__"] for s in samples) == sorted(corpus.key_of[d] for d in corpus.originals)
    for s in samples:
        meta = json.loads(s["json"])
        assert s["txt"].decode() == corpus.texts[meta["id"]] and meta["key"] == s["__key__"]
    shards = ShardOutput(str(out))
    assert shards.done_shards() == {int(s["name"]) for s in manifest["shards"]}
    for s in manifest["shards"]:
        assert hashlib.sha256((out / s["tar"]).read_bytes()).hexdigest() == s["sha256"]
        keys = shards.read_parquet(s["parquet"]).column("key").to_pylist()
        assert sorted(shards.read_tar(s["tar"])) == sorted(keys) and s["samples"] == len(keys)

    # Lineage: the input this was made from, by digest.
    source = json.loads((corpus.shards / "manifest.json").read_text())
    assert manifest["input"]["digest"] == source["digest"] and manifest["run_digest"]
    assert manifest["samples"] == len(corpus.originals)

    stats = json.loads((out / "stats.json").read_text())
    assert stats == result.stats and stats["input"]["corrupt_shards"] == {}
    assert [s["step"] for s in stats["steps"]] == ["exact_dedup", "minhash_dedup"]
    check_step_counts(stats, len(corpus.texts))
    assert stats["steps"][0]["dropped"] == {"exact_duplicate": len(corpus.exact)}
    assert stats["steps"][1]["dropped"] == {"near_duplicate": len(corpus.near)}
    report = (out / "report.html").read_text()
    assert report.startswith("<!") and "minhash_dedup" in report and "near_duplicate" in report


# -- reruns and the cache -------------------------------------------------------------------------
class WordCount(Step):
    """Score `words`; drop documents with fewer than `min_words`. Appends the number of rows it
    scores to the file `calls` (it runs in Ray's workers, so the count goes through the disk)."""

    name = "word_count"

    class Params(StepParams):
        calls: str
        min_words: int = threshold(0, ge=0)

    def score(self, batch: pd.DataFrame) -> dict[str, pd.Series]:
        with open(self.params.calls, "a") as f:
            f.write(f"{len(batch)}\n")
        return {"words": batch["text"].str.split().str.len()}

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        return reasons(batch["words"] < self.params.min_words, "too_few_words")


def scored_rows(calls: Path) -> list[int]:
    return [int(n) for n in calls.read_text().split()] if calls.exists() else []


def counted_config(corpus: Corpus, tmp_path: Path, jaccard: float = 0.5, min_words: int = 0) -> CurateConfig:
    steps = [DEDUP[0], {**DEDUP[1], "jaccard": jaccard},
             {"step": f"{__name__}:WordCount", "calls": str(tmp_path / "calls.txt"), "min_words": min_words}]
    return dedup_config(corpus, tmp_path / "out", steps)


def test_rerun_with_the_same_config_does_nothing(tmp_path: Path, corpus: Corpus) -> None:
    config = counted_config(corpus, tmp_path)
    first = curate(config)
    assert sum(scored_rows(tmp_path / "calls.txt")) == len(corpus.originals)
    before = snapshot(tmp_path / "out")

    again = curate(config.model_copy(update={"max_in_flight": 1, "partitions": 3}))  # run options only

    assert again.up_to_date and again.manifest == first.manifest and again.stats == first.stats
    assert snapshot(tmp_path / "out") == before
    assert sum(scored_rows(tmp_path / "calls.txt")) == len(corpus.originals)


def test_changed_thresholds_rerun_with_cached_scores(tmp_path: Path, corpus: Corpus) -> None:
    calls = tmp_path / "calls.txt"
    curate(counted_config(corpus, tmp_path))
    words = {d: len(t.split()) for d, t in corpus.texts.items()}

    # The scored step's own threshold: a new result, and not one row scored again.
    stricter = curate(counted_config(corpus, tmp_path, min_words=95))

    assert not stricter.up_to_date
    assert sorted(kept_ids(tmp_path / "out")) == sorted(d for d in corpus.originals if words[d] >= 95)
    assert sum(scored_rows(calls)) == len(corpus.originals)
    short = [r for r in removed(tmp_path / "out") if r["step"] == "word_count"]
    assert len(short) == sum(words[d] < 95 for d in corpus.originals) > 0
    assert all(r["reason"] == "too_few_words" and json.loads(r["scores"])["words"] < 95 for r in short)
    check_step_counts(stricter.stats, len(corpus.texts))

    # An earlier dedup's threshold: the near copies now stay, and only they are scored.
    looser = curate(counted_config(corpus, tmp_path, jaccard=0.95, min_words=95))

    survivors = corpus.originals | corpus.near
    assert sorted(kept_ids(tmp_path / "out")) == sorted(d for d in survivors if words[d] >= 95)
    assert sum(scored_rows(calls)) == len(survivors)
    assert looser.stats["steps"][1]["dropped"] == {}
    check_step_counts(looser.stats, len(corpus.texts))


# -- one run per output, nothing stale in it ------------------------------------------------------
def test_output_holds_only_the_shards_of_its_last_run(tmp_path: Path, corpus: Corpus) -> None:
    out = tmp_path / "out"
    curate(dedup_config(corpus, out))
    assert len(list(out.glob("*.tar"))) == 4
    small = tmp_path / "small"
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"id": d, "text": t}) + "\n"
                                                  for d, t in list(corpus.texts.items())[:50]))
    crawl_text(TextCrawlConfig(input=str(tmp_path / "small.jsonl"), output=str(small), shard_size=70, quiet=True))
    (out / "00007.tar").write_bytes(b"published, then its writer was killed")

    result = curate(dedup_config(corpus, out).model_copy(update={"input": str(small)}))

    assert [s["tar"] for s in result.manifest["shards"]] == ["00000.tar"]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".tar", ".parquet") or "_stats" in p.name) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "removed.parquet"]


def test_output_is_owned_by_one_run(tmp_path: Path, corpus: Corpus) -> None:
    out = tmp_path / "out"
    with ShardOutput(str(out)).lock():
        with pytest.raises(PipelineError, match=f"^{out}: in use by another run \\(pid "):
            curate(dedup_config(corpus, out))
    assert not list(out.glob("*.tar"))
    assert curate(dedup_config(corpus, out)).ok  # once the other run is over


# -- a corrupt input shard ------------------------------------------------------------------------
def test_corrupt_shard_is_reported_and_skipped(tmp_path: Path, corpus: Corpus) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(corpus.shards, shards)
    tar = shards / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    lost = set(pq.read_table(shards / "00001.parquet").column("id").to_pylist())
    out = tmp_path / "out"

    result = curate(CurateConfig(input=str(shards), output=str(out), steps=DEDUP, quiet=True,
                                 allow_skipped_shards=True))

    assert result.ok and result.skipped_shards == result.stats["input"]["corrupt_shards"]
    assert list(result.stats["input"]["corrupt_shards"]) == ["00001"]
    assert "00001.tar" in result.stats["input"]["corrupt_shards"]["00001"]
    assert json.loads((out / "stats.json").read_text())["input"]["corrupt_shards"] == \
        result.stats["input"]["corrupt_shards"]
    assert result.manifest["stats"]["corrupt_shards"] == 1 and not result.failed_shards
    assert [s["name"] for s in result.manifest["shards"]] == ["00000", "00002", "00003"]
    assert not (out / "00001.tar").exists()
    # The other shards are curated as if shard 1 were not there: of each original and its copies,
    # the first one left in input order stays.
    left = [d for d in corpus.texts if d not in lost]
    first_of_group: dict[str, str] = {}
    for d in left:
        first_of_group.setdefault(corpus.original_of.get(d, d), d)
    assert sorted(kept_ids(out)) == sorted(first_of_group.values())
    check_step_counts(result.stats, len(left))


# -- bad configs ----------------------------------------------------------------------------------
def test_unknown_step_lists_the_available_ones(tmp_path: Path, corpus: Corpus) -> None:
    with pytest.raises(PipelineError) as info:
        curate(dedup_config(corpus, tmp_path / "out", [DEDUP[0], {"step": "minhash_dedupe"}]))
    message = str(info.value)
    assert "'minhash_dedupe'" in message
    assert all(name in message for name in available_steps())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, parameter", [
    ({"step": "minhash_dedup", "bands": 0}, "bands"),
    ({"step": "minhash_dedup", "jaccard": 1.5}, "jaccard"),
    ({"step": "exact_dedup", "treshold": 3}, "treshold"),  # an unknown key
    ({"step": "minhash_dedup", "keep": "highest"}, "keep_column"),
    ({"step": "phash_dedup", "max_distance": 9, "index_distance": 8}, "max_distance"),
])
def test_bad_parameter_is_named(tmp_path: Path, corpus: Corpus, spec: dict, parameter: str) -> None:
    with pytest.raises(PipelineError) as info:
        curate(dedup_config(corpus, tmp_path / "out", [DEDUP[0], spec]))
    assert str(info.value).startswith(f"steps[1] ({spec['step']}): ") and parameter in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps, expected", [
    ([{"step": "minhash_dedup", "bands": 0}], "bands"),
    ([{"step": "no_such_step"}], "unknown curation step 'no_such_step'"),
])
def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path, corpus: Corpus, steps: list, expected: str) -> None:
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"steps": steps}))

    run = CliRunner().invoke(app, ["curate", "--input", str(corpus.shards), "--output", str(tmp_path / "out"),
                                   "--config", str(config), "--quiet"])

    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    assert "Traceback" not in run.output and not (tmp_path / "out").exists()


# -- steps from outside the package ---------------------------------------------------------------
@ray.remote
def importable_in_worker(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def word_in(text: str, word: str) -> bool:
    return word in re.findall(r"\w+", text.lower())


def test_step_by_module_path_runs_without_being_installed_on_workers(
        tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    assert not ray.get(importable_in_worker.remote("wordfilter_steps"))  # only the driver can import it
    word = corpus.texts["d000"].split()[0]
    steps = [{"step": "wordfilter_steps:DropWord", "word": word}, DEDUP[0]]

    result = curate(dedup_config(corpus, tmp_path / "out", steps))

    assert result.ok
    dropped = {d for d in corpus.texts if word_in(corpus.texts[d], word)}
    assert 0 < len(dropped) < len(corpus.texts)
    assert sorted(kept_ids(tmp_path / "out")) == sorted(
        d for d in corpus.texts if d not in dropped and d not in corpus.exact)
    first = result.stats["steps"][0]
    assert (first["step"], first["dropped"]) == ("drop_word", {"contains_word": len(dropped)})


def test_step_from_an_installed_plugin(tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "drop_word" not in available_steps()
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))  # holds pipelines_wordfilter-0.1.dist-info

    steps = available_steps()

    assert steps["drop_word"].value == "wordfilter_steps:DropWord"  # an entry point, loaded when used
    assert find_step("drop_word") is sys.modules["wordfilter_steps"].DropWord
    word = corpus.texts["d001"].split()[-1]
    result = curate(dedup_config(corpus, tmp_path / "out", [{"step": "drop_word", "word": word}]))
    assert sorted(kept_ids(tmp_path / "out")) == sorted(d for d in corpus.texts if not word_in(corpus.texts[d], word))
    assert result.stats["steps"][0]["dropped"]["contains_word"] > 0


# -- image shards ---------------------------------------------------------------------------------
def reencoded(photo: Photo) -> Photo:
    """The photo resized by 0.8 and saved again as JPEG quality 70."""
    with Image.open(io.BytesIO(photo.data)) as im:
        small = im.convert("RGB").resize((round(photo.width * 0.8), round(photo.height * 0.8)),
                                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=70)
    return Photo(f"{photo.name}-small", buf.getvalue(), small.width, small.height, np.asarray(small))


@pytest.fixture
def photo_web(photos: list[Photo], bomb_png: bytes) -> Iterator[WebServer]:
    """/img/0.jpg .. /img/4.jpg: the five photos; /img/5.jpg, /img/6.jpg: photos 1 and 3 re-encoded."""
    web = WebServer(photos + [reencoded(photos[1]), reencoded(photos[3])], bomb_png)
    yield web
    web.close()


def test_images_default_config_removes_copies_and_reencodings(tmp_path: Path, photo_web: WebServer,
                                                               photos: list[Photo]) -> None:
    # Originals first, so keep: first keeps them; the same URL twice, and two re-encoded copies.
    urls = [f"/img/{i}.jpg" for i in range(5)] + ["/img/1.jpg", "/img/5.jpg", "/img/3.jpg", "/img/6.jpg"]
    (tmp_path / "urls.jsonl").write_text(
        "".join(json.dumps({"url": photo_web.url(u), "caption": f"photo {i}"}) + "\n" for i, u in enumerate(urls)))
    crawl = crawl_images(ImageCrawlConfig(
        input=str(tmp_path / "urls.jsonl"), output=str(tmp_path / "shards"), shard_size=4,
        image={"image_size": 128}, fetch={"allow_private_network": True, "retries": 0, "timeout": 5}, quiet=True))
    assert crawl.ok and crawl.manifest["samples"] == len(urls)
    key_of = {r["caption"]: r["key"] for r in read_rows(tmp_path / "shards")}
    config = load_config(CurateConfig, ROOT / "configs/curate/images-default.yaml",
                         {("input",): str(tmp_path / "shards"), ("output",): str(tmp_path / "out"), ("quiet",): True})

    phash = next(s for s in config.steps if s["step"] == "phash_dedup")

    result = curate(config)

    assert result.ok
    out = tmp_path / "out"
    assert sorted(r["caption"] for r in read_rows(out)) == [f"photo {i}" for i in range(5)]
    gone = {r["key"]: r for r in removed(out)}
    assert set(gone) == {key_of[f"photo {i}"] for i in (5, 6, 7, 8)}
    for copy, original, step, reason in [(5, 1, "exact_dedup", "exact_duplicate"),
                                         (7, 3, "exact_dedup", "exact_duplicate"),
                                         (6, 1, "phash_dedup", "near_duplicate_image"),
                                         (8, 3, "phash_dedup", "near_duplicate_image")]:
        r = gone[key_of[f"photo {copy}"]]
        assert (r["step"], r["reason"], r["kept_key"]) == (step, reason, key_of[f"photo {original}"]), r
        assert r["similarity"] >= 1 - phash["max_distance"] / phash.get("hash_size", 8) ** 2
        assert (r["width"], r["height"]) == ((photos[original].width, photos[original].height) if step == "exact_dedup"
                                             else (round(photos[original].width * 0.8),
                                                   round(photos[original].height * 0.8)))
    check_step_counts(result.stats, len(urls))
    samples = list(wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False,
                                  empty_check=False))
    assert sorted(s["txt"].decode() for s in samples) == [f"photo {i}" for i in range(5)]
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)


def test_skipped_shards_fail_the_run_unless_accepted(tmp_path: Path, corpus: Corpus) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(corpus.shards, shards)
    tar = shards / "00002.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"steps": DEDUP}))
    args = ["curate", "--input", str(shards), "--output", str(tmp_path / "out"), "--config", str(config), "--quiet"]

    for _ in range(2):  # the run, then its rerun (up to date): both fail
        run = CliRunner().invoke(app, args)
        assert run.exit_code == 1, run.output
        assert "1 corrupt input shard(s) skipped (00002)" in run.stderr and "--allow-skipped-shards" in run.stderr

    accepted = CliRunner().invoke(app, args + ["--allow-skipped-shards"])
    assert accepted.exit_code == 0, accepted.output
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["input"]["corrupt_shards"].keys() == {"00002"}


# -- curated shards are data: types kept, strict JSON, read by webdataset and datasets ------------
def test_curated_shards_keep_their_types_and_load_with_webdataset_and_datasets(
        tmp_path: Path, photo_web: WebServer) -> None:
    # Text: `title` on every other document (null on the rest), `year` an integer column with nulls.
    docs = [{"id": f"t{i}", "text": f"document {i} " + "word " * (5 + i),
             **({"title": f"title {i}", "year": 2000 + i} if i % 2 == 0 else {})} for i in range(24)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    crawl_text(TextCrawlConfig(input=str(tmp_path / "docs.jsonl"), output=str(tmp_path / "shards/text"),
                               shard_size=10, quiet=True))
    urls = [f"/img/{i}.jpg" for i in range(7)] + ["/img/1.jpg"]
    (tmp_path / "urls.jsonl").write_text("".join(
        json.dumps({"url": photo_web.url(u), "caption": f"photo {i}", **({"rank": i} if i % 3 else {})}) + "\n"
        for i, u in enumerate(urls)))
    crawl = crawl_images(ImageCrawlConfig(
        input=str(tmp_path / "urls.jsonl"), output=str(tmp_path / "shards/images"), shard_size=4,
        image={"image_size": 64}, fetch={"allow_private_network": True, "retries": 0, "timeout": 5}, quiet=True))
    assert crawl.ok
    steps = {"text": [{"step": "length", "min_words": 8}, {"step": "language", "min_score": 0},
                      {"step": "exact_dedup"}],
             "images": [{"step": "aspect_ratio"}, {"step": "exact_dedup", "match": "image"}]}

    for kind in ("text", "images"):
        result = curate(CurateConfig(input=str(tmp_path / "shards" / kind), output=str(tmp_path / "curated" / kind),
                                     steps=steps[kind], quiet=True))
        assert result.ok and 0 < result.stats["output"]["samples"] < result.stats["input"]["samples"]

        source, curated = tmp_path / "shards" / kind, tmp_path / "curated" / kind
        # The input's columns with the input's types (int32 stays int32, with its nulls), then the scores.
        schema_in = pq.read_schema(source / "00000.parquet")
        added = {"text": {"length_words": pa.int64(), "length_chars": pa.int64(), "language_score": pa.float64()},
                 "images": {"aspect_ratio": pa.float64()}}[kind]
        for part in sorted(curated.glob("*.parquet")):
            if part.name == "removed.parquet":
                continue
            schema_out = pq.read_schema(part)
            assert [(f.name, f.type) for f in schema_out][:len(schema_in)] == [(f.name, f.type) for f in schema_in]
            assert {f.name: f.type for f in schema_out}.items() >= added.items()
        assert_loadable(source, tmp_path / "hf" / f"shards-{kind}")
        assert assert_loadable(curated, tmp_path / "hf" / f"curated-{kind}") == result.stats["output"]["samples"]

    metas = {m["id"]: m for m in (json.loads(s["json"]) for s in wds.WebDataset(
        [str(p) for p in sorted((tmp_path / "curated/text").glob("*.tar"))], shardshuffle=False, empty_check=False))}
    assert metas["t10"]["year"] == 2010 and type(metas["t10"]["year"]) is int
    assert metas["t11"]["year"] is None and metas["t11"]["title"] is None and metas["t11"]["http_status"] is None
    removed_scores = [json.loads(r["scores"], parse_constant=lambda c: pytest.fail(f"bare {c} in removed.parquet"))
                      for r in removed(tmp_path / "curated/text")]
    assert removed_scores


# -- the cache follows the code -------------------------------------------------------------------
PLUGIN_SOURCE = '''
import pandas as pd
from pipelines.curate.step import Step, StepParams, reasons, threshold


class Marked(Step):
    """Score `mark`; drop rows whose mark is below `min_mark`. Appends how many rows it scored to `calls`."""

    name = "marked"
    adds = ("mark",)

    class Params(StepParams):
        calls: str
        min_mark: int = threshold(0)

    def score(self, batch: pd.DataFrame) -> dict:
        with open(self.params.calls, "a") as f:
            f.write(f"{len(batch)}\\n")
        return {"mark": pd.Series(MARK, index=batch.index)}

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        return reasons(batch["mark"] < self.params.min_mark, "low_mark")
'''


def test_an_edited_step_is_recomputed(tmp_path: Path, corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "plugin" / "edited_steps.py"
    module.parent.mkdir()
    monkeypatch.syspath_prepend(str(module.parent))
    calls = tmp_path / "calls.txt"
    config = dedup_config(corpus, tmp_path / "out", [{"step": "edited_steps:Marked", "calls": str(calls)}])
    n = len(corpus.texts)

    def run_with(mark: str, **options: Any) -> tuple[Any, set[Any]]:
        module.write_text(PLUGIN_SOURCE.replace("MARK", mark))
        sys.modules.pop("edited_steps", None)  # a new process, as a user's next command is
        importlib.invalidate_caches()
        result = curate(config.model_copy(update=options))
        return result, {r["mark"] for r in read_rows(tmp_path / "out")}

    first, marks = run_with("1")
    assert marks == {1} and sum(scored_rows(calls)) == n
    again, _ = run_with("1")
    assert again.up_to_date and sum(scored_rows(calls)) == n

    # score() edited: the run is not up to date, every row is scored again, and the output has the new scores.
    edited, marks = run_with("(1 + 1)")
    assert not edited.up_to_date and marks == {2} and sum(scored_rows(calls)) == 2 * n
    assert edited.manifest["run_digest"] != first.manifest["run_digest"]

    # --force recomputes what is cached.
    forced, marks = run_with("(1 + 1)", force=True)
    assert not forced.up_to_date and marks == {2} and sum(scored_rows(calls)) == 3 * n
    assert forced.manifest["run_digest"] == edited.manifest["run_digest"]
    run = CliRunner().invoke(app, ["curate", "--input", str(corpus.shards), "--output", str(tmp_path / "out"),
                                   "--config", str(_yaml(tmp_path, config.steps)), "--quiet", "--force"])
    assert run.exit_code == 0, run.output
    assert sum(scored_rows(calls)) == 4 * n


def _yaml(tmp_path: Path, steps: list[dict[str, Any]]) -> Path:
    path = tmp_path / "steps.yaml"
    path.write_text(yaml.safe_dump({"steps": steps}))
    return path


class ScoresWithThreshold(Step):
    """Wrong on purpose: its score reads `min_words`, declared a threshold, so a cached score would go
    stale when `min_words` changes."""

    name = "scores_with_threshold"
    adds = ("long_enough",)

    class Params(StepParams):
        min_words: int = threshold(0, ge=0)

    def score(self, batch: pd.DataFrame) -> dict[str, pd.Series]:
        return {"long_enough": batch["text"].str.split().str.len() >= self.params.min_words}

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        return reasons(~batch["long_enough"], "too_short")


def test_a_score_that_reads_a_threshold_is_an_error(tmp_path: Path, corpus: Corpus) -> None:
    steps = [{"step": f"{__name__}:ScoresWithThreshold", "min_words": 90}]

    with pytest.raises(PipelineError, match=r"^step scores_with_threshold: its scoring code reads `min_words`, "):
        curate(dedup_config(corpus, tmp_path / "out", steps))

    assert not list((tmp_path / "out").glob("*.tar"))


# -- every step's columns are checked before any work ---------------------------------------------
@pytest.mark.parametrize("steps, step, missing", [
    ([{"step": "length"}, {"step": "aspect_ratio"}], "aspect_ratio", "width, height"),
    ([{"step": "language"}, {"step": "pii_redact"}, {"step": "image_size"}], "image_size", "width, height"),
    ([{"step": "length"}, {"step": "exact_dedup", "keep": "highest", "keep_column": "length_word"}],
     "exact_dedup", "length_word"),
    ([{"step": "length"}, {"step": "phash_dedup"}], "phash_dedup", "image"),
])
def test_a_missing_column_stops_the_run_before_any_work(tmp_path: Path, corpus: Corpus, steps: list,
                                                        step: str, missing: str) -> None:
    with pytest.raises(PipelineError, match=rf"^steps\[{len(steps) - 1}\] \({step}\) needs column\(s\) {missing}; "):
        curate(dedup_config(corpus, tmp_path / "out", steps))
    assert not (tmp_path / "out" / "_work").exists()


def test_a_column_an_earlier_step_declares_is_not_missing(tmp_path: Path, corpus: Corpus) -> None:
    steps = [{"step": "length"}, {"step": "minhash_dedup", "keep": "highest", "keep_column": "length_words"}]
    assert curate(dedup_config(corpus, tmp_path / "out", steps)).ok


def test_a_column_missing_after_an_undeclared_scorer_stops_the_run(tmp_path: Path, corpus: Corpus) -> None:
    # WordCount does not say what it adds: the check runs on each batch, before aspect_ratio sees it.
    steps = [{"step": f"{__name__}:WordCount", "calls": str(tmp_path / "calls.txt")}, {"step": "aspect_ratio"}]
    with pytest.raises(PipelineError, match=r"^step aspect_ratio needs column\(s\) width, height; "):
        curate(dedup_config(corpus, tmp_path / "out", steps))
    assert not list((tmp_path / "out").glob("*.tar"))
