"""The pretraining data stream on real crawled shards: the manifest, the tokenizer, determinism, the
split across ranks, uneven shards, exact resume (with and without dataloader workers, across chunk
and epoch boundaries), held-out samples and unreadable tars."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pipelines.errors import PipelineError
from pipelines.train import data
from pipelines.ingest.text import TextCrawlConfig, crawl_text
from pipelines.train.data import (ShardSet, TokenStream, heldout_batches, is_heldout, iter_texts, make_loader,
                                  open_shards)
from pipelines.train.tokenizer import load_tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("ray_cluster")

VOCAB = 400
SEQ_LEN = 32
UNICODE_WORDS = ["naïve", "café", "日本語", "Ωμέγα", "🙂", "straße"]


@dataclass(frozen=True)
class Shards:
    shards: ShardSet
    tar_texts: list[list[str]]  # per tar, the texts in tar order

    @property
    def texts(self) -> list[str]:
        return [t for texts in self.tar_texts for t in texts]


def crawl(root: Path, docs: int, shard_size: int, words: tuple[int, int], seed: int) -> Shards:
    """`docs` documents, each opening with a unique marker «NNN» and then random words (a few of them
    not ASCII), crawled by the real text crawler into shards of `shard_size`."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = [a + b for a in syllables for b in syllables] + UNICODE_WORDS * 20
    texts = [f"«{i:03d}» " + " ".join(rng.choice(vocab, rng.integers(*words))) for i in range(docs)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i:03d}", "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    crawl_text(TextCrawlConfig(input=str(root / "corpus.jsonl"), output=str(root / "shards"),
                               shard_size=shard_size, quiet=True))
    shards = open_shards(str(root / "shards"))
    return Shards(shards, [[t for _, t in iter_texts(shards, 0, "train", [tar])] for tar in shards.tars])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """200 documents of 20 to 50 words in 4 tars of 50."""
    return crawl(tmp_path_factory.mktemp("corpus"), 200, 50, (20, 51), seed=1)


@pytest.fixture(scope="module")
def three_tars(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """60 short documents in 3 tars of 20."""
    return crawl(tmp_path_factory.mktemp("three"), 60, 20, (8, 20), seed=2)


@pytest.fixture(scope="module")
def one_tar(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """20 short documents in one tar."""
    return crawl(tmp_path_factory.mktemp("one"), 20, 50, (8, 20), seed=3)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Shards, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(corpus.texts, VOCAB, out)
    return out


def stream(shards: Shards, tokenizer_dir: str, **options) -> TokenStream:
    settings = dict(seq_len=SEQ_LEN, micro_batch=4, rank=0, world_size=1, seed=7, heldout_percent=0.0)
    return TokenStream(shards.shards, tokenizer_dir, **{**settings, **options})


def take(batches, n: int) -> list[torch.Tensor]:
    return list(islice(batches, n))


def first_documents(tokenizer_dir: str, batches, n: int) -> list[str]:
    """The first `n` complete documents of an unshuffled stream (shuffle_buffer=1): its tokens in order,
    split at each eos."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens: list[int] = []
    for batch in batches:
        tokens.extend(batch.flatten().tolist())
        if tokens.count(tokenizer.eos_token_id) >= n:
            break
    docs, doc = [], []
    for t in tokens:
        if t == tokenizer.eos_token_id:
            docs.append(tokenizer.decode(doc))
            doc = []
        else:
            doc.append(t)
    return docs[:n]


def token_count(tokenizer_dir: str, texts: list[str]) -> int:
    """Tokens of `texts` as packed: each document's ids and its eos."""
    tokenizer = load_tokenizer(tokenizer_dir)
    return sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


# -- shards and tokenizer -------------------------------------------------------------------------
def test_open_shards_lists_the_tars_of_the_manifest(corpus: Shards) -> None:
    shards = corpus.shards
    manifest = json.loads((Path(shards.url) / "manifest.json").read_text())

    assert shards.digest == manifest["digest"] and shards.manifest == manifest
    assert shards.tars == [f"{shards.url}/{s['tar']}" for s in manifest["shards"]] and len(shards.tars) == 4
    assert all(Path(t).is_file() for t in shards.tars)
    assert [len(t) for t in corpus.tar_texts] == [50] * 4


def test_open_shards_names_the_url_of_a_folder_it_cannot_use(tmp_path: Path, corpus: Shards) -> None:
    with pytest.raises(PipelineError, match=f"{tmp_path}: no manifest.json"):
        open_shards(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PipelineError, match=f"{tmp_path}: cannot read manifest.json"):
        open_shards(str(tmp_path))
    manifest = json.loads((Path(corpus.shards.url) / "manifest.json").read_text())
    for shards in ([], [dict(s, samples=0) for s in manifest["shards"]]):
        (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, shards=shards)))
        with pytest.raises(PipelineError, match=f"no shards found in {tmp_path}"):
            open_shards(str(tmp_path))


def test_tokenizer_reloads_with_auto_tokenizer_and_round_trips_any_text(tokenizer_dir: str, tmp_path: Path,
                                                                         corpus: Shards) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "naïve café — 日本語 🙂 never seen: ∮ E⋅da = Q,  n → ∞\n\ttabs and  spaces "

    assert len(tokenizer) == VOCAB  # the corpus has merges to spare: the vocabulary is full, not more
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer(text)["input_ids"] == load_tokenizer(tokenizer_dir)(text)["input_ids"]  # no bos/eos added
    assert {tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token, tokenizer.pad_token} == {"<|endoftext|>"}
    small = train_tokenizer(corpus.texts, 300, str(tmp_path / "small"))
    assert len(small) == 300 and small.decode(small(text)["input_ids"]) == text
    with pytest.raises(PipelineError, match="vocab_size 100"):
        train_tokenizer(corpus.texts, 100, str(tmp_path / "tiny"))


# -- the stream -----------------------------------------------------------------------------------
def test_same_settings_give_the_same_batches_and_another_seed_others(corpus: Shards, tokenizer_dir: str) -> None:
    first = take(stream(corpus, tokenizer_dir, shuffle_buffer=32), 30)
    again = take(stream(corpus, tokenizer_dir, shuffle_buffer=32), 30)
    other = take(stream(corpus, tokenizer_dir, shuffle_buffer=32, seed=8), 30)
    in_order = take(stream(corpus, tokenizer_dir, shuffle_buffer=1), 8)

    assert all(b.dtype == torch.long and b.shape == (4, SEQ_LEN) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    # The first 32 sequences are the unshuffled first 32, in another order.
    shuffled, plain = torch.cat(first[:8]), torch.cat(in_order)
    assert not torch.equal(shuffled, plain)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, plain.tolist()))


def test_ranks_read_disjoint_tars_that_together_cover_the_epoch(corpus: Shards, tokenizer_dir: str) -> None:
    """4 tars, 2 ranks: in the first epoch each rank reads 2 whole tars, 100 documents, in order
    (shuffle_buffer=1 keeps the packing order, so the documents can be read back)."""
    docs = [first_documents(tokenizer_dir, stream(corpus, tokenizer_dir, rank=r, world_size=2, shuffle_buffer=1), 100)
            for r in range(2)]
    tar_of = {text: i for i, texts in enumerate(corpus.tar_texts) for text in texts}

    assert all(len(set(d)) == 100 for d in docs)
    assert not set(docs[0]) & set(docs[1])
    assert set(docs[0]) | set(docs[1]) == set(corpus.texts)
    assert [len({tar_of[text] for text in d}) for d in docs] == [2, 2]


def test_with_fewer_tars_than_ranks_each_rank_takes_every_other_sample(one_tar: Shards, tokenizer_dir: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 3)  # packing carries across tokenizer batches
    docs = [first_documents(tokenizer_dir, stream(one_tar, tokenizer_dir, rank=r, world_size=2, shuffle_buffer=1), 10)
            for r in range(2)]

    assert docs == [one_tar.texts[0::2], one_tar.texts[1::2]]


@pytest.mark.parametrize("shards", ["three_tars", "one_tar"])
def test_uneven_shards_never_run_a_rank_dry(shards: str, tokenizer_dir: str, request: pytest.FixtureRequest) -> None:
    """3 tars (or 1) on 2 ranks: each rank gets ever more batches, far beyond what one epoch holds."""
    chosen: Shards = request.getfixturevalue(shards)
    epoch_batches = token_count(tokenizer_dir, chosen.texts) // (4 * SEQ_LEN)
    for rank in range(2):
        batches = take(stream(chosen, tokenizer_dir, rank=rank, world_size=2), 4 * epoch_batches)
        assert len(batches) == 4 * epoch_batches and all(b.shape == (4, SEQ_LEN) for b in batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly_where_the_state_was_taken(three_tars: Shards, tokenizer_dir: str,
                                                            num_workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2. With 2 workers there are 4 streams for 3 tars (every stream reads all tars, every
    4th sample); with none, 2 streams of disjoint tars. Batches of 3 sequences from chunks of 8 cross
    chunk boundaries, and tokenizer batches of 5 documents make packing cross those. The first resume
    falls on an odd batch, the second in a later epoch, just after a stream finished a chunk."""
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 5)
    options = dict(rank=1, world_size=2, micro_batch=3, shuffle_buffer=8, num_workers=num_workers)
    reference = take(stream(three_tars, tokenizer_dir, **options), 70)  # plain iteration, in process

    first = stream(three_tars, tokenizer_dir, **options)
    assert all(torch.equal(a, b) for a, b in zip(take(make_loader(first), 7), reference[:7], strict=True))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == 7 and state["next_stream"] == 7 % max(1, num_workers)

    resumed = stream(three_tars, tokenizer_dir, **options)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(make_loader(resumed), 41), reference[7:48], strict=True))
    state = json.loads(json.dumps(resumed.state_dict()))
    assert min(s["epoch"] for s in state["streams"]) >= 1
    assert any(s["emitted"] == 0 and s["chunk"] > 0 for s in state["streams"])  # 48 x 3 sequences: a chunk's end

    again = stream(three_tars, tokenizer_dir, **options)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(make_loader(again), 22), reference[48:], strict=True))


def test_resume_from_after_any_batch(three_tars: Shards, tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One sequence per batch and no shuffling: every sequence start, wherever it falls (in a document,
    at its eos, in what a tokenizer batch carried over to the next), is a place to resume from."""
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 5)
    options = dict(rank=1, world_size=2, micro_batch=1, shuffle_buffer=1)
    uninterrupted = stream(three_tars, tokenizer_dir, **options)
    reference, states = [], []
    for batch in islice(uninterrupted, 60):
        reference.append(batch)
        states.append(uninterrupted.state_dict())

    for k in range(59):
        resumed = stream(three_tars, tokenizer_dir, **options)
        resumed.load_state_dict(states[k])
        assert torch.equal(next(iter(resumed)), reference[k + 1]), k
    assert {s["streams"][0]["epoch"] for s in states} == {0, 1, 2}


def test_a_state_resumes_only_the_stream_it_came_from(three_tars: Shards, tokenizer_dir: str) -> None:
    state = stream(three_tars, tokenizer_dir).state_dict()
    other = stream(three_tars, tokenizer_dir, seed=8)
    with pytest.raises(PipelineError, match="seed was 7, now 8"):
        other.load_state_dict(state)


# -- held-out -------------------------------------------------------------------------------------
def test_heldout_samples_never_reach_the_training_stream(corpus: Shards, tokenizer_dir: str) -> None:
    heldout = {t for _, t in iter_texts(corpus.shards, 25, "heldout")}
    training = set(corpus.texts) - heldout
    assert 25 < len(heldout) < 75  # about a quarter of 200

    docs = first_documents(tokenizer_dir, stream(corpus, tokenizer_dir, heldout_percent=25, shuffle_buffer=1),
                           len(training))

    assert set(docs) == training
    # Shuffled, over three epochs, no sequence holds a held-out document's marker.
    tokenizer = load_tokenizer(tokenizer_dir)
    epochs = 3 * token_count(tokenizer_dir, sorted(training)) // (4 * SEQ_LEN)
    batches = take(stream(corpus, tokenizer_dir, heldout_percent=25), epochs)
    text = "\n".join(tokenizer.batch_decode(torch.cat(batches)))
    assert not any(doc.split()[0] in text for doc in heldout)


def complete_documents(tokenizer_dir: str, texts: list[str], batch_tokens: int) -> list[str]:
    """The documents of `texts` that end within the whole batches they pack into."""
    ends = np.cumsum([token_count(tokenizer_dir, [t]) for t in texts])
    kept = ends[-1] // batch_tokens * batch_tokens
    return texts[:int((ends <= kept).sum())]


def decoded_documents(tokenizer_dir: str, batches: list[torch.Tensor]) -> list[str]:
    """The complete documents of unshuffled batches that start at a document's start."""
    return load_tokenizer(tokenizer_dir).decode(torch.cat(batches).flatten()).split("<|endoftext|>")[:-1]


def test_heldout_batches_are_the_heldout_samples_the_same_every_time(corpus: Shards, tokenizer_dir: str) -> None:
    heldout = [[t for _, t in iter_texts(corpus.shards, 25, "heldout", [tar])] for tar in corpus.shards.tars]
    options = dict(seq_len=SEQ_LEN, micro_batch=4, max_batches=1000, heldout_percent=25)

    batches = heldout_batches(corpus.shards, tokenizer_dir, **options)
    per_rank = [heldout_batches(corpus.shards, tokenizer_dir, **options, rank=r, world_size=2) for r in range(2)]

    assert all(torch.equal(a, b) for a, b in
               zip(batches, heldout_batches(corpus.shards, tokenizer_dir, **options), strict=True))
    first_three = heldout_batches(corpus.shards, tokenizer_dir, **dict(options, max_batches=3))
    assert len(first_three) == 3 and all(torch.equal(a, b) for a, b in zip(first_three, batches))
    assert decoded_documents(tokenizer_dir, batches) == complete_documents(tokenizer_dir, sum(heldout, []), 128)
    # 4 tars on 2 ranks: rank r has the held-out samples of tars r and r + 2.
    for rank, batches in enumerate(per_rank):
        texts = heldout[rank] + heldout[rank + 2]
        assert decoded_documents(tokenizer_dir, batches) == complete_documents(tokenizer_dir, texts, 128)


def test_is_heldout_is_a_stable_hash_of_the_key() -> None:
    keys = [f"{i:08d}" for i in range(2000)]

    assert is_heldout("00000042", 50) == is_heldout("00000042", 50)
    assert not any(is_heldout(k, 0) for k in keys)
    assert 150 < sum(is_heldout(k, 10) for k in keys) < 250
    assert all(is_heldout(k, 20) for k in keys if is_heldout(k, 10))  # a larger share contains the smaller


# -- unreadable tars ------------------------------------------------------------------------------
def test_an_unreadable_tar_is_skipped_with_a_warning(three_tars: Shards, tokenizer_dir: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(three_tars.shards.url, tmp_path / "shards")
    shards = open_shards(str(tmp_path / "shards"))
    Path(shards.tars[1]).write_bytes(b"not a tar at all" * 100)
    Path(shards.tars[2]).unlink()
    broken = Shards(shards, three_tars.tar_texts)

    with caplog.at_level(logging.WARNING, logger="pipelines.train.data"):
        docs = first_documents(tokenizer_dir, stream(broken, tokenizer_dir, shuffle_buffer=1), 40)

    assert set(docs) == set(three_tars.tar_texts[0])  # epoch after epoch, only the readable tar
    assert "00001.tar: cannot read, skipped" in caplog.text and "00002.tar: cannot read, skipped" in caplog.text
