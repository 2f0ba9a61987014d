"""`clip_score` and `semantic_dedup` with a tiny CLIP trained here (tests/tiny_clip.py), on the step directly
and through `curate()` on image shards, with the model from a folder and from the MLflow registry."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.curate.run import CurateConfig, curate
from pipelines.curate.steps.clip import ClipScore, ClipScoreParams, SemanticDedup, SemanticDedupParams
from pipelines.errors import PipelineError
from pipelines.shards import ShardOutput, write_manifest, write_shard
from pipelines.train.clip_model import load_clip
from tests.tiny_clip import PAIRS, draw, jpeg, samples

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def registered(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny CLIP registered as models:/tiny-clip@champion in a fresh MLflow (SQLite)."""
    from pipelines.train.registry import register_clip, training_run

    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINES_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        with training_run("clip-tests", None, {}) as run_id:
            pass
        register_clip(str(tiny_clip), "tiny-clip", run_id=run_id, metric="recall_at_1", value=1.0)
        yield "models:/tiny-clip@champion"


def write_image_shards(root: Path, shards: list[list[tuple[bytes, str]]]) -> list[list[str]]:
    """Image shards as `pipelines crawl images` writes them (jpg + txt + json per sample); returns the keys."""
    out = ShardOutput(str(root))
    stats, keys = [], []
    for sid, rows in enumerate(shards):
        shard_keys = [f"{sid:05d}{i:04d}" for i in range(len(rows))]
        sizes = [Image.open(io.BytesIO(data)).size for data, _ in rows]
        table = pa.table({"key": shard_keys, "caption": [c for _, c in rows], "status": ["success"] * len(rows),
                          "width": [w for w, _ in sizes], "height": [h for _, h in sizes]})
        files = [(k, {"jpg": d, "txt": c.encode(), "json": b"{}"}) for k, (d, c) in zip(shard_keys, rows, strict=True)]
        stats.append(write_shard(out, sid, files, table, {"count": len(rows)}))
        keys.append(shard_keys)
    write_manifest(out, "images", {}, "test", stats, {})
    return keys


def read_rows(folder: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(folder.glob("0*.parquet"))], ignore_index=True)


def removed(folder: Path) -> pd.DataFrame:
    return pq.read_table(folder / "removed.parquet").to_pandas()


def run(shards: Path, out: Path, steps: list[dict[str, Any]]) -> Any:
    result = curate(CurateConfig(input=str(shards), output=str(out), steps=steps, quiet=True, report=False))
    assert result.ok
    return result


# -- clip_score ----------------------------------------------------------------------------------
def test_clip_score_ranks_matching_captions_above_shuffled(tiny_clip: Path) -> None:
    data = samples(48, seed=11)
    images = [jpeg(im) for im, _ in data]
    captions = [c for _, c in data]
    step = ClipScore(ClipScoreParams(model=str(tiny_clip)))
    matching = step.score(pd.DataFrame({"image": images, "text": captions}))["clip_score"]
    shuffled = step.score(pd.DataFrame({"image": images, "text": np.roll(captions, 5)}))["clip_score"]
    assert matching.mean() > shuffled.mean() + 0.3
    auc = (matching[:, None] > shuffled[None, :]).mean()  # P(a matching pair outscores a shuffled one)
    assert auc >= 0.8, auc


def test_clip_score_of_an_image_that_does_not_decode_is_nan(tiny_clip: Path) -> None:
    step = ClipScore(ClipScoreParams(model=str(tiny_clip)))
    scores = step.score(pd.DataFrame({"image": [b"not an image", jpeg(samples(1, 0)[0][0])],
                                      "text": ["a red circle", "a red circle"]}))["clip_score"]
    assert np.isnan(scores[0]) and scores[1] > 0


def test_clip_step_needs_a_model_folder_or_uri(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="neither models:/NAME@ALIAS nor a model folder"):
        ClipScore(ClipScoreParams(model=str(tmp_path)))


def test_clip_score_thresholds_do_not_change_the_score_cache_key() -> None:
    a = ClipScoreParams(model="m", min_score=0.2)
    assert a.score_digest() == ClipScoreParams(model="m", fraction=0.3).score_digest()
    assert SemanticDedupParams(model="m").score_digest() == SemanticDedupParams(model="m", eps=0.2,
                                                                                 clusters=4).score_digest()


def test_clip_score_keeps_the_top_fraction_over_all_shards(registered: str, tmp_path: Path) -> None:
    """Half the captions are right and half are another shape's: the top half by score is the right half,
    across shards (a global cut); then a threshold on the same run reuses the cached scores."""
    rng = np.random.default_rng(5)
    shards, right = [], set()
    for sid in range(3):
        rows = []
        for i in range(16):
            colour, shape = PAIRS[(sid * 16 + i) % len(PAIRS)]
            caption = f"a {colour} {shape}" if i % 2 == 0 else f"a {COLOUR_SWAP[colour]} {SHAPE_SWAP[shape]}"
            rows.append((jpeg(draw(colour, shape, rng)), caption))
            if i % 2 == 0:
                right.add(f"{sid:05d}{i:04d}")
        shards.append(rows)
    write_image_shards(tmp_path / "shards", shards)

    run(tmp_path / "shards", tmp_path / "top", [{"step": "clip_score", "model": registered, "fraction": 0.5}])

    kept = read_rows(tmp_path / "top")
    assert len(kept) == 24
    assert len(set(kept["key"]) & right) >= 22  # the model is tiny: allow two near the cut
    assert kept["clip_score"].between(-1, 1).all()
    gone = removed(tmp_path / "top")
    assert set(gone["reason"]) == {"clip_score_below_top_fraction"}
    assert gone["similarity"].max() < kept["clip_score"].min()  # one cut over every shard

    cut = float(np.median(kept["clip_score"]))
    run(tmp_path / "shards", tmp_path / "min", [{"step": "clip_score", "model": registered, "min_score": cut}])
    kept_min = read_rows(tmp_path / "min")
    assert (kept_min["clip_score"] >= cut).all()
    assert (removed(tmp_path / "min")["similarity"] < cut).all()
    assert len(kept_min) + len(removed(tmp_path / "min")) == 48


SHAPE_SWAP = {"circle": "square", "square": "triangle", "triangle": "circle"}
COLOUR_SWAP = {"red": "blue", "blue": "yellow", "yellow": "green", "green": "red"}


# -- semantic_dedup -------------------------------------------------------------------------------
def planted(tiny_clip: Path) -> tuple[list[bytes], dict[int, list[bytes]]]:
    """JPEG originals and, per original, its copies: re-encoded at quality 40, resized, cropped by 2 pixels.

    The model is tiny, so the test takes the originals it tells apart (pairwise cosine < 0.8) and whose copies
    it sees as copies (cosine > 0.97): what is under test is the step, not the model."""
    bundle = load_clip(str(tiny_clip))
    rng = np.random.default_rng(3)
    originals: list[bytes] = []
    copies: dict[int, list[bytes]] = {}
    chosen = np.zeros((0, bundle.model.config.projection_dim), np.float32)
    for colour, shape in PAIRS:
        im = draw(colour, shape, rng, size=96)
        variants = [jpeg(im, 40), jpeg(im.resize((80, 80)), 95), jpeg(im.crop((2, 2, 94, 94)), 95)]
        emb = bundle.embed_images([jpeg(im)] + variants)
        if (emb[1:] @ emb[0] > 0.97).all() and (chosen @ emb[0] < 0.8).all():
            copies[len(originals)] = variants
            originals.append(jpeg(im))
            chosen = np.concatenate([chosen, emb[:1]])
    return originals, copies


def test_semantic_dedup_removes_planted_copies_and_keeps_distinct_images(tiny_clip: Path, tmp_path: Path) -> None:
    originals, copies = planted(tiny_clip)
    assert len(originals) >= 4
    # Originals in shard 0, their copies spread over shards 1 and 2.
    rows = [[(data, f"original {i}") for i, data in enumerate(originals)], [], []]
    for i, group in copies.items():
        for n, data in enumerate(group):
            rows[1 + (i + n) % 2].append((data, f"copy {i}.{n}"))
    keys = write_image_shards(tmp_path / "shards", rows)

    run(tmp_path / "shards", tmp_path / "out",
        [{"step": "semantic_dedup", "model": str(tiny_clip), "keep": "first", "eps": 0.05}])

    kept = read_rows(tmp_path / "out")
    assert sorted(kept["caption"]) == sorted(f"original {i}" for i in range(len(originals)))
    gone = removed(tmp_path / "out").set_index("key")
    assert set(gone["reason"]) == {"semantic_duplicate"}
    caption_of = {k: c for shard, rs in zip(keys, rows, strict=True) for k, (_, c) in zip(shard, rs, strict=True)}
    for key, row in gone.iterrows():
        original = caption_of[key].split()[1].split(".")[0]
        assert caption_of[row["kept_key"]] == f"original {original}"
        assert row["similarity"] > 0.95
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    step = next(s for s in stats["steps"] if s["step"] == "semantic_dedup")
    assert step["dropped"] == {"semantic_duplicate": 3 * len(originals)}


def test_semantic_dedup_keeps_one_per_group_farthest_from_the_centroid(tiny_clip: Path, tmp_path: Path) -> None:
    """SemDeDup's default keep, on the step's global phase alone (one cluster): one row per group stays."""
    from pipelines.curate.steps.clip import semantic_duplicates

    originals, copies = planted(tiny_clip)
    step = SemanticDedup(SemanticDedupParams(model=str(tiny_clip), clusters=1))
    images = originals + [data for i in copies for data in copies[i]]
    group = list(range(len(originals))) + [i for i in copies for _ in copies[i]]
    emb = step.signature(pd.DataFrame({"image": images}))["embedding"]
    rec = sig_file(emb, tmp_path)
    dups = semantic_duplicates([rec], step.params.model_dump(mode="json"))
    survivors = sorted(set(range(len(images))) - set(dups["gid"].tolist()))
    assert sorted(group[i] for i in survivors) == list(range(len(originals)))
    # Farthest from the centroid within a group of near-copies: the kept key is never a removed one.
    assert not set(dups["kept_key"]) & {f"k{g}" for g in dups["gid"].tolist()}


def test_semantic_dedup_finds_copies_within_k_means_clusters(tiny_clip: Path, tmp_path: Path) -> None:
    """Many clusters: 40 random directions, each with two noisy copies; every copy goes, every original stays."""
    from pipelines.curate.steps.clip import semantic_duplicates

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 64))
    noisy = np.repeat(base, 2, axis=0) + rng.normal(scale=0.03, size=(80, 64))
    emb = np.concatenate([base, noisy]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    params = SemanticDedupParams(model=str(tiny_clip), keep="first", clusters=8)
    dups = semantic_duplicates([sig_file(emb, tmp_path)], params.model_dump(mode="json"))
    assert dups["gid"].tolist() == list(range(40, 120))
    assert dups["kept_key"] == [f"k{i // 2}" for i in range(80)]


def sig_file(emb: np.ndarray, folder: Path) -> Any:
    from pipelines.curate.step import SignatureRef

    path = folder / "sig.npz"
    np.savez(path, embedding=emb, gid=np.arange(len(emb), dtype=np.int64),
             key=np.array([f"k{i}" for i in range(len(emb))], dtype="S"), priority=np.zeros(len(emb)))
    return SignatureRef(0, str(path), len(emb))
