"""The Ray dedup machinery: connected components, the similarities, and near duplicates end to end.

Near duplicates run on signature files made the way a shard task makes them (`signature` plus `gid`,
`key`, `priority`), so every case is one `find_duplicates` call; the keep policies run through
`curate` on crawled shards, with a scoring step of this module feeding `keep: highest`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray

from pipelines.curate import dedup
from pipelines.curate.run import CurateConfig, curate
from pipelines.curate.step import SignatureRef, Step
from pipelines.curate.steps.dedup import MinHashDedup
from pipelines.ingest.text import TextCrawlConfig, crawl_text

pytestmark = pytest.mark.usefixtures("ray_cluster")

WORD = re.compile(r"\w+")


# -- connected components -------------------------------------------------------------------------
def union_find_roots(edges: list[tuple[int, int]]) -> dict[int, int]:
    """Node -> smallest node of its component, by union-find (the reference)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent)}


def random_graph(seed: int) -> list[tuple[int, int]]:
    """Chains, stars, isolated edges, a 200-node path and a sparse random part, on gids of several
    shards; node labels are shuffled so no component is numbered along its edges."""
    rng = np.random.default_rng(seed)
    nodes = iter(rng.permutation(3000))
    gid = {}

    def node() -> int:
        n = int(next(nodes))
        gid[n] = ((n % 5) << dedup.SHARD_BITS) | n  # gids of five shards, as a shard task makes them
        return gid[n]

    edges = []
    for length in rng.integers(2, 12, 6):  # chains
        path = [node() for _ in range(length)]
        edges += list(zip(path[:-1], path[1:], strict=False))
    for leaves in rng.integers(2, 10, 4):  # stars: a centre and its leaves
        centre = node()
        edges += [(centre, node()) for _ in range(leaves)]
    edges += [(node(), node()) for _ in range(8)]  # isolated edges
    path = [node() for _ in range(200)]  # one long path
    edges += list(zip(path[:-1], path[1:], strict=False))
    pool = [node() for _ in range(60)]  # sparse random graph: trees, cycles, isolated pairs
    edges += [(pool[i], pool[j]) for i, j in rng.integers(0, 60, (50, 2)) if i != j]
    edges = sorted({(min(a, b), max(a, b)) for a, b in edges})  # verified edges: a < b, unique
    return [edges[i] for i in rng.permutation(len(edges))]


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_components_equal_union_find(seed: int, parts: int) -> None:
    edges = random_graph(seed)
    pieces = np.array_split(np.array(edges, dtype=np.int64), 4)  # one piece per upstream part, one empty
    refs = [ray.put({"a": p[:, 0], "b": p[:, 1]} if len(p) else {}) for p in pieces] + [ray.put({})]

    labels = [r for r in ray.get(dedup.connected_components(refs, parts)) if r]

    u = np.concatenate([r["u"] for r in labels])
    v = np.concatenate([r["v"] for r in labels])
    assert len(np.unique(u)) == len(u)  # one root per node
    expected = union_find_roots(edges)
    found = dict(zip(u.tolist(), v.tolist(), strict=True))
    assert {n: found.get(n, n) for n in expected} == expected  # a root has no record of its own
    assert set(found) == {n for n, r in expected.items() if n != r}


# -- similarities ---------------------------------------------------------------------------------
def flat(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.r_[0, np.cumsum([len(s) for s in sets])].astype(np.int64)
    return np.concatenate(sets).astype(np.uint32), offsets


def reference_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


@pytest.mark.parametrize("pairs, largest", [(300, 60), (70_000, 4)])
def test_jaccard_equals_set_reference(pairs: int, largest: int) -> None:
    rng = np.random.default_rng(pairs)
    # Shingle hashes are 32-bit; a small universe makes the random sets overlap a lot.
    universe = rng.choice(2**32, size=4 * largest + 8, replace=False).astype(np.uint32)
    universe[:2] = [0, 2**32 - 1]

    def some_set() -> np.ndarray:
        return np.unique(rng.choice(universe, size=rng.integers(0, largest + 1)))  # sorted, unique; may be empty

    a_sets = [some_set() for _ in range(pairs)]
    b_sets = [some_set() for _ in range(pairs)]
    empty, five = np.zeros(0, np.uint32), np.sort(universe[:5])
    a_sets[:4] = [empty, empty, five, five]
    b_sets[:4] = [empty, five, empty, five.copy()]

    got = dedup.jaccard(*flat(a_sets), *flat(b_sets))

    expected = np.array([reference_jaccard(a, b) for a, b in zip(a_sets, b_sets, strict=True)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[:4].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert ((expected > 0) & (expected < 1)).mean() > 0.1  # many sets really overlap partly


@pytest.mark.parametrize("words", [1, 4])  # 64-bit and 256-bit hashes
def test_hamming_similarity(words: int) -> None:
    rng = np.random.default_rng(words)
    a = rng.integers(0, 2**64, size=(500, words), dtype=np.uint64)
    b = a.copy()
    flip = rng.integers(0, 64 * words, size=500)
    b[np.arange(500), flip // 64] ^= np.uint64(1) << (flip % 64).astype(np.uint64)  # one bit apart
    b[:250] = rng.integers(0, 2**64, size=(250, words), dtype=np.uint64)
    a[-3:], b[-3:] = [[0], [0], [2**64 - 1]], [[0], [2**64 - 1], [2**64 - 1]]
    offsets = np.arange(501, dtype=np.int64) * words

    got = dedup.hamming_similarity(a.ravel(), offsets, b.ravel(), offsets)

    expected = [1 - sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(ra, rb, strict=True)) / (64 * words)
                for ra, rb in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[-3:].tolist() == [1.0, 0.0, 1.0] and set(got[250:-3]) == {1 - 1 / (64 * words)}


# -- near duplicates end to end -------------------------------------------------------------------
def shingles(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text (what MinHashDedup hashes)."""
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb)


def signature_files(tmp_path: Path, step: MinHashDedup, shards: list[list[tuple[str, str]]]) -> list[SignatureRef]:
    """One signature file per shard of (key, text) rows, written the way a shard task writes it."""
    refs = []
    for sid, rows in enumerate(shards):
        batch = pd.DataFrame(rows, columns=["key", "text"])
        sig = step.signature(batch)
        sig["gid"] = (np.int64(sid) << dedup.SHARD_BITS) + np.arange(len(batch), dtype=np.int64)
        sig["key"] = np.array(batch["key"].tolist(), dtype="S")
        sig["priority"] = step.priority(batch)
        path = tmp_path / f"{sid:05d}.sig.npz"
        np.savez(path, **sig)
        refs.append(SignatureRef(sid, str(path), len(batch)))
    return refs


# A chain of five: each document is the previous one shifted by 20 of 100 words, so with 5-word
# shingles neighbours share 76 of 116 (J = 0.655) and documents two apart 56 of 136 (J = 0.41).
CHAIN_WORDS = [f"river{i}" for i in range(200)]
CHAIN = {name: " ".join(CHAIN_WORDS[20 * i:20 * i + 100]) for i, name in enumerate("ABCDE")}


@pytest.mark.parametrize("parts", [1, 3])
def test_near_duplicates_chain_is_not_transitive(tmp_path: Path, parts: int) -> None:
    t = 0.6
    assert true_jaccard(CHAIN["A"], CHAIN["B"]) >= t and true_jaccard(CHAIN["B"], CHAIN["C"]) >= t
    assert true_jaccard(CHAIN["A"], CHAIN["C"]) < 0.45  # still an LSH candidate pair most of the time
    rng = np.random.default_rng(3)
    vocab = [f"w{i}" for i in range(5000)]
    others = {f"u{i}": " ".join(rng.choice(vocab, 60)) for i in range(30)}  # unrelated documents
    # The chain spread over three shards in input order; unrelated documents around it.
    shards = [[("A", CHAIN["A"])] + list(others.items())[:10] + [("B", CHAIN["B"])],
              list(others.items())[10:20] + [("C", CHAIN["C"]), ("D", CHAIN["D"])],
              [("E", CHAIN["E"])] + list(others.items())[20:]]
    texts = {k: v for shard in shards for k, v in shard}
    step = MinHashDedup(MinHashDedup.Params(ngram=5, bands=25, rows=2, jaccard=t))

    dups = step.find_duplicates(signature_files(tmp_path, step, shards), parts)

    by_key = {shards[g >> dedup.SHARD_BITS][g & 0xFFFFFFFF][0]: (kept, sim)
              for g, kept, sim in zip(dups.gid.tolist(), dups.kept_key, dups.similarity, strict=True)}
    # Keep first: A stays, B goes for A; C has no edge to A, so it stays and D goes for C; E stays.
    assert {k: kept for k, (kept, _) in by_key.items()} == {"B": "A", "D": "C"}
    kept = set(texts) - set(by_key)
    for key, (kept_key, sim) in by_key.items():
        assert kept_key in kept
        assert true_jaccard(texts[key], texts[kept_key]) >= t
        assert sim == pytest.approx(true_jaccard(texts[key], texts[kept_key]))
    for a in kept:  # what stays has no near duplicate left among it
        assert all(true_jaccard(texts[a], texts[b]) < t for b in kept if b != a)
    assert set(dups.reason) == {"near_duplicate"} and len(set(dups.cluster)) == 1


# -- keep policies through curate -----------------------------------------------------------------
class Quality(Step):
    """Score `quality` from the corpus's `rating` column (for keep: highest)."""

    name = "quality"
    columns = ("rating",)

    def score(self, batch: pd.DataFrame) -> dict[str, pd.Series]:
        return {"quality": pd.to_numeric(batch["rating"]) / 5}


@pytest.fixture(scope="module")
def rated_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Crawled shards with two clusters of three near copies each (first, longest and best rated are
    three different documents) among unrelated documents; returns the shards and id -> key."""
    root = tmp_path_factory.mktemp("rated")
    rng = np.random.default_rng(11)
    vocab = [f"w{i}" for i in range(5000)]

    def text(n: int) -> list[str]:
        return list(rng.choice(vocab, n))

    docs = []
    for c in range(2):
        base = text(100)
        changed = list(base)
        changed[30], changed[70] = "changed", "again"
        # First in input order, longest (base + 20 words) and best rated: J >= 0.68 between any two.
        members = [(f"c{c}-first", base, 1), (f"c{c}-longest", base + text(20), 2), (f"c{c}-best", changed, 5)]
        if c == 1:
            members = members[::-1]  # the best rated comes first: keep first and highest agree
        docs += [{"id": i, "text": " ".join(w), "rating": r} for i, w, r in members]
        docs += [{"id": f"u{c}-{j}", "text": " ".join(text(80)), "rating": 3} for j in range(12)]
    order = [0, 3, 6, 1, 4, 7, 2, 5, 8] + list(range(9, len(docs)))  # cluster 0 spread over the shards
    docs = [docs[i] for i in order]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    crawl_text(TextCrawlConfig(input=str(root / "corpus.jsonl"), output=str(root / "shards"), shard_size=8,
                               quiet=True))
    rows = pd.concat([pq.read_table(p).to_pandas() for p in sorted((root / "shards").glob("*.parquet"))])
    return root / "shards", dict(zip(rows["id"], rows["key"], strict=True))


@pytest.mark.parametrize("keep, kept", [
    ("first", {"c0-first", "c1-best"}),
    ("longest", {"c0-longest", "c1-longest"}),
    ("highest", {"c0-best", "c1-best"}),
    ("none", set()),
])
def test_keep_policies(tmp_path: Path, rated_corpus: tuple[Path, dict[str, str]], keep: str, kept: set[str]) -> None:
    shards, key_of = rated_corpus
    minhash = {"step": "minhash_dedup", "jaccard": 0.6, "bands": 25, "rows": 2, "keep": keep}
    if keep == "highest":
        minhash["keep_column"] = "quality"
    config = CurateConfig(input=str(shards), output=str(tmp_path / "out"), quiet=True, report=False,
                          steps=[{"step": f"{__name__}:Quality"}, minhash])

    result = curate(config)

    out_ids = set()
    for p in sorted((tmp_path / "out").glob("[0-9]*.parquet")):
        out_ids |= set(pq.read_table(p).column("id").to_pylist())
    clusters = {i for i in key_of if i.startswith("c")}
    assert out_ids & clusters == kept
    assert {i for i in key_of if i.startswith("u")} <= out_ids  # every unrelated document stays
    removed = pq.read_table(tmp_path / "out" / "removed.parquet").to_pylist()
    id_of = {k: i for i, k in key_of.items()}
    assert sorted(id_of[r["key"]] for r in removed) == sorted(clusters - kept)
    assert {(r["step"], r["reason"]) for r in removed} == {("minhash_dedup", "near_duplicate")}
    for r in removed:
        if keep == "none":
            assert r["kept_key"] is None
        else:  # kept for the one copy of its own cluster that stays
            assert id_of[r["kept_key"]] in kept and id_of[r["kept_key"]][:2] == id_of[r["key"]][:2]
        assert r["similarity"] >= 0.6
    clusters_of_removed = Counter(r["cluster_id"] for r in removed)
    assert len(clusters_of_removed) == 2 and None not in clusters_of_removed
    assert set(clusters_of_removed.values()) == {3 - len(kept) // 2}
    assert result.stats["steps"][1]["dropped"] == {"near_duplicate": 6 - len(kept)}
