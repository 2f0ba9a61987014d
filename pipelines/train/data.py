"""The data side of pretraining: shards -> documents -> tokens -> packed sequences -> micro-batches.

`TokenStream` reads the text of our WebDataset shards (`KEY.txt`, the caption for image shards),
tokenizes it in batches, packs every document's ids plus `<|endoftext|>` into `seq_len` chunks (no
padding: a remainder carries into the next chunk), shuffles them in a buffer and yields
`[micro_batch, seq_len]` LongTensors, forever: epochs repeat, each in its own tar order.

Splitting. Each training rank runs `max(1, num_workers)` logical streams, one per dataloader worker;
`S = world_size * max(1, num_workers)` streams in all, stream `rank * W + worker`. With at least S
tars, stream s reads tars s, s+S, ... of the epoch's shuffled tar order (disjoint tars); with fewer,
every stream reads every tar and takes the training samples whose running index % S == s. Since every
stream is infinite, every rank always has a next batch: uneven shards never leave a rank waiting in a
collective. Samples whose key `is_heldout` never enter the training stream.

Resuming. A stream shuffles in chunks of `shuffle_buffer` sequences, each permuted by a generator
seeded from (seed, stream, chunk number). Its position is the chunk's start (epoch, tar, sample,
token within that document, running index) and how many of the chunk's sequences were handed out;
resuming rebuilds that one chunk and skips those. `make_loader` carries each worker's position
along with its batch, so the main process always knows where every stream stands.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, replace
from itertools import chain, islice
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.errors import PipelineError
from pipelines.shards import TAR_ERRORS, read_manifest, read_tar
from pipelines.train.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

STATE_FORMAT = "pipelines.train.TokenStream/v1"
TOKENIZE_BATCH = 256  # documents per encode_batch call
EMPTY_EPOCHS = 10  # a stream that finds no training sample in this many epochs in a row has none to find


# -- shards and texts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSet:
    """A shard folder as listed by its manifest."""

    url: str  # as given
    digest: str  # manifest["digest"]: identifies the content
    manifest: dict
    tars: list[str]  # full URLs/paths of the tars of the shards with samples, in manifest order


def open_shards(url: str) -> ShardSet:
    """The shard set at `url` (local folder or fsspec URL), from its `manifest.json`."""
    manifest = read_manifest(url)
    shards = [s for s in manifest["shards"] if isinstance(s, dict) and s.get("samples") and s.get("tar")]
    if not shards:
        raise PipelineError(f"no shards found in {url}")
    base = url.rstrip("/")
    return ShardSet(url, str(manifest.get("digest", "")), manifest, [f"{base}/{s['tar']}" for s in shards])


def is_heldout(key: str, percent: float) -> bool:
    """Whether sample `key` belongs to the held-out `percent`: a stable hash of the key, the same everywhere."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < percent / 100 * 2**64


def read_texts(url: str, ext: str = "txt") -> list[tuple[str, str]]:
    """(key, text) of every sample of a shard tar with a `.{ext}` member (its text), in tar order.

    A tar that cannot be read (missing, truncated, not a tar) counts as empty, with a warning: one bad
    shard must not stop a training run. It is read whole before anything is returned, so a tar that
    breaks halfway gives nothing rather than a part that would shift every position after it.
    """
    try:
        samples = read_tar(url, [ext])
    except TAR_ERRORS as exc:
        log.warning("%s: cannot read, skipped (%s: %s)", url, type(exc).__name__, exc)
        return []
    return [(key, s[ext].decode("utf-8", "replace")) for key, s in samples.items()]


def iter_texts(shards: ShardSet, heldout_percent: float, split: Literal["train", "heldout"],
               tars: list[str] | None = None, member: str = "txt") -> Iterator[tuple[str, str]]:
    """(key, text of its `member`) of the samples of `split` in `tars` (default: all of the shard set's), in order."""
    if split not in ("train", "heldout"):
        raise PipelineError(f"split {split!r}: must be 'train' or 'heldout'")
    for url in shards.tars if tars is None else tars:
        for key, text in read_texts(url, member):
            if is_heldout(key, heldout_percent) == (split == "heldout"):
                yield key, text


# -- packing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cursor:
    """A place in a stream's documents: `token` tokens (its eos counted) into the `sample`-th sample of
    the `tar`-th tar of the stream's tar list for `epoch`; `index` is that document's running index
    among the training samples the stream looks at in the epoch."""

    epoch: int = 0
    tar: int = 0
    sample: int = 0
    token: int = 0
    index: int = 0


def pack(docs: Iterator[tuple[Cursor, str]], tokenizer: Any, seq_len: int,
         skip: int = 0) -> Iterator[tuple[np.ndarray, Cursor]]:
    """Each document's ids and eos, concatenated and cut into `seq_len` sequences, each with the cursor
    where it starts; the first `skip` tokens of the first document are left out. A finite input's
    last, incomplete sequence is dropped."""
    eos = tokenizer.eos_token_id
    encode = tokenizer.backend_tokenizer.encode_batch_fast
    carry, carry_at = np.empty(0, np.int64), None  # tokens left over from the previous batch, and where they start
    while batch := list(islice(docs, TOKENIZE_BATCH)):
        cursors = [c for c, _ in batch]
        ids = [e.ids for e in encode([text for _, text in batch], add_special_tokens=False)]
        lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
        starts = np.cumsum(lengths) - lengths
        flat = np.fromiter(chain.from_iterable(chain(x, (eos,)) for x in ids), np.int64, int(lengths.sum()))
        tokens = np.concatenate([carry, flat[skip:]])

        def cursor_at(offset: int) -> Cursor:
            if offset < len(carry):  # only ever 0: a carry is shorter than a sequence
                return carry_at
            at = offset - len(carry) + skip
            doc = int(np.searchsorted(starts, at, "right")) - 1
            return replace(cursors[doc], token=int(at - starts[doc]))

        n = len(tokens) // seq_len
        for i in range(n):
            yield tokens[i * seq_len:(i + 1) * seq_len], cursor_at(i * seq_len)
        carry_at = cursor_at(n * seq_len) if len(tokens) > n * seq_len else None
        carry, skip = tokens[n * seq_len:], 0


# -- the training stream ----------------------------------------------------------------------------
class TokenStream(IterableDataset):
    """Infinite, deterministic, resumable micro-batches (`[micro_batch, seq_len]` LongTensors) of packed
    training tokens for one rank; see the module docstring for the split, shuffle and resume rules.

    Iterated directly (or through `make_loader` with 0 workers), it hands out its logical streams'
    batches round robin, as a DataLoader with `num_workers` workers would, and keeps `state_dict()` in
    step. A DataLoader made by hand yields the same batches, but only `make_loader` keeps the state.
    One iterator at a time: each continues from the recorded state.
    """

    def __init__(self, shards: ShardSet, tokenizer_dir: str, *, seq_len: int, micro_batch: int, rank: int,
                 world_size: int, seed: int, shuffle_buffer: int = 256, heldout_percent: float = 1.0,
                 num_workers: int = 0):
        for name, value, low in (("seq_len", seq_len, 1), ("micro_batch", micro_batch, 1),
                                 ("world_size", world_size, 1), ("shuffle_buffer", shuffle_buffer, 1),
                                 ("num_workers", num_workers, 0)):
            if value < low:
                raise PipelineError(f"{name} {value}: must be at least {low}")
        if not 0 <= rank < world_size:
            raise PipelineError(f"rank {rank}: must be in [0, world_size={world_size})")
        if not 0 <= heldout_percent < 100:
            raise PipelineError(f"heldout_percent {heldout_percent}: must be in [0, 100)")
        self.shards, self.tokenizer_dir = shards, tokenizer_dir
        self.seq_len, self.micro_batch, self.rank, self.world_size = seq_len, micro_batch, rank, world_size
        self.seed, self.shuffle_buffer, self.heldout_percent = seed, shuffle_buffer, heldout_percent
        self.num_workers = num_workers
        self.workers = max(1, num_workers)  # logical streams of this rank
        self.streams = world_size * self.workers  # logical streams in all
        self._positions = [self._start() for _ in range(self.workers)]
        self._next = 0  # which of this rank's logical streams hands out the next batch
        self._batches = 0

    # -- state ----------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, "digest": self.shards.digest, "seed": self.seed, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "shuffle_buffer": self.shuffle_buffer,
                "heldout_percent": self.heldout_percent}

    @staticmethod
    def _start() -> dict[str, int]:
        return {"chunk": 0, "emitted": 0, **asdict(Cursor())}

    def state_dict(self) -> dict:
        """Where the stream stands after the last batch handed out (JSON-serialisable)."""
        return {"format": STATE_FORMAT, **self._settings(), "batches": self._batches, "next_stream": self._next,
                "streams": [dict(p) for p in self._positions]}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` (from `state_dict`) stood; call before iterating."""
        if state.get("format") != STATE_FORMAT:
            raise PipelineError(f"data state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for name, value in self._settings().items():
            if state.get(name) != value:
                raise PipelineError(f"data state: {name} was {state.get(name)!r}, now {value!r}; "
                                    "a stream resumes exactly only with the same shards and settings")
        self._positions = [dict(p) for p in state["streams"]]
        self._next, self._batches = state["next_stream"], state["batches"]

    def _record(self, worker: int, position: dict[str, int]) -> None:
        """A batch of logical stream `worker` was handed out; `position` is where that stream now stands."""
        self._positions[worker] = position
        self._next = (worker + 1) % self.workers
        self._batches += 1

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        if info is not None:  # in a DataLoader worker: play one logical stream (make_loader keeps the state)
            yield from (batch for batch, _ in self._worker_batches(self._logical_worker(info)))
            return
        tokenizer = load_tokenizer(self.tokenizer_dir)
        streams = [self._worker_batches(w, tokenizer) for w in range(self.workers)]
        while True:
            worker = self._next
            batch, position = next(streams[worker])
            self._record(worker, position)
            yield batch

    def _logical_worker(self, info: Any) -> int:
        """The logical stream a DataLoader worker plays: rotated so that worker 0, whose batch the loader
        hands out first, plays the stream that is next."""
        if info.num_workers != self.workers:
            raise PipelineError(f"TokenStream made for num_workers={self.num_workers} "
                                f"but loaded with {info.num_workers} workers")
        return (self._next + info.id) % self.workers

    def _worker_batches(self, worker: int, tokenizer: Any = None) -> Iterator[tuple[torch.Tensor, dict[str, int]]]:
        """Logical stream `worker` of this rank from its recorded position: each batch with the position after it."""
        tokenizer = tokenizer or load_tokenizer(self.tokenizer_dir)
        stream = self.rank * self.workers + worker
        position = self._positions[worker]
        chunk, emitted = position["chunk"], position["emitted"]
        start = Cursor(**{k: position[k] for k in ("epoch", "tar", "sample", "token", "index")})
        sequences = self._sequences(self._documents(stream, start), tokenizer, start.token)
        upcoming = next(sequences)  # read one ahead: the next chunk's start is the position after a chunk's last batch
        rows: list[np.ndarray] = []
        while True:
            buffer = [upcoming, *islice(sequences, self.shuffle_buffer - 1)]
            upcoming = next(sequences)
            order = np.random.default_rng([self.seed, stream, chunk]).permutation(len(buffer))
            for i in order[emitted:]:
                rows.append(buffer[i][0])
                emitted += 1
                if len(rows) == self.micro_batch:
                    if emitted < len(buffer):
                        after = {"chunk": chunk, "emitted": emitted, **asdict(start)}
                    else:
                        after = {"chunk": chunk + 1, "emitted": 0, **asdict(upcoming[1])}
                    yield torch.from_numpy(np.stack(rows)), after
                    rows = []
            chunk, emitted, start = chunk + 1, 0, upcoming[1]

    # What a stream reads from each sample, and how documents become rows; `ExampleStream` changes both.
    member = "txt"

    def _sequences(self, docs: Iterator[tuple[Cursor, str]], tokenizer: Any,
                   skip: int) -> Iterator[tuple[np.ndarray, Cursor]]:
        return pack(docs, tokenizer, self.seq_len, skip=skip)

    def _documents(self, stream: int, start: Cursor) -> Iterator[tuple[Cursor, str]]:
        """The training documents of `stream` from `start` on, each with its cursor, through epoch after epoch."""
        walk = training_samples(
            self.shards, self.seed, stream, self.streams, self.heldout_percent, lambda url: read_texts(url, self.member),
            (start.epoch, start.tar, start.sample, start.index),
            f"{self.shards.url}: stream {stream} of {self.streams} found no training sample in {EMPTY_EPOCHS} "
            "epochs (too few samples for world_size x num_workers, all held out, or unreadable tars)")
        for epoch, t, k, index, (_, text) in walk:
            yield Cursor(epoch, t, k, 0, index), text


def training_samples(shards: ShardSet, seed: int, stream: int, streams: int, heldout_percent: float,
                     read: Callable[[str], list[tuple[Any, ...]]], start: tuple[int, int, int, int],
                     nothing_found: str) -> Iterator[tuple[int, int, int, int, tuple[Any, ...]]]:
    """The training samples of logical stream `stream` of `streams` from `start` = (epoch, tar, sample,
    index) on, epoch after epoch, as (epoch, tar, sample, index, sample), `read(url)` listing a tar's samples
    as (key, ...). Each epoch's tar order is shuffled from (seed, epoch); with at least `streams` tars stream
    s reads tars s, s+streams, ...; with fewer, every stream reads them all and takes every streams-th
    training sample (`index` counts them). Held-out keys are skipped. A stream that finds nothing in
    EMPTY_EPOCHS epochs in a row raises PipelineError(nothing_found)."""
    epoch, first_tar, skip, index = start
    empty_epochs = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(shards.tars))
        tars = [shards.tars[i] for i in order]
        shared = len(tars) < streams
        if not shared:
            tars = tars[stream::streams]
        found = False
        for t in range(first_tar, len(tars)):
            samples = read(tars[t])
            for k in range(skip, len(samples)):
                if is_heldout(samples[k][0], heldout_percent):
                    continue
                if not shared or index % streams == stream:
                    found = True
                    yield epoch, t, k, index, samples[k]
                index += 1
            skip = 0
        empty_epochs = 0 if found else empty_epochs + 1
        if empty_epochs == EMPTY_EPOCHS:
            raise PipelineError(nothing_found)
        epoch, first_tar, index = epoch + 1, 0, 0


class _PositionedBatches(IterableDataset):
    """What `make_loader`'s workers run: each batch with its logical stream and the position after it."""

    def __init__(self, stream: TokenStream):
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, dict[str, int]]]:
        worker = self.stream._logical_worker(get_worker_info())
        for batch, position in self.stream._worker_batches(worker):
            yield worker, batch, position


class StreamLoader:
    """A DataLoader over a `TokenStream`'s workers that keeps the stream's state in step with the batches
    it has handed out. Each worker sends its position with each batch; the DataLoader hands batches out
    from workers 0, 1, ..., W-1 in turn, and workers are assigned logical streams so that this order
    continues the stream's."""

    def __init__(self, stream: TokenStream):
        self.stream = stream

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = DataLoader(_PositionedBatches(self.stream), batch_size=None, num_workers=self.stream.num_workers,
                            pin_memory=torch.cuda.is_available(), in_order=True)
        for worker, batch, position in loader:
            self.stream._record(worker, position)
            yield batch


def make_loader(stream: TokenStream) -> Iterable[torch.Tensor]:
    """What the training loop iterates: the stream itself with 0 workers, else a `StreamLoader`; either
    way `stream.state_dict()` matches the batches handed out so far."""
    return StreamLoader(stream) if stream.num_workers > 0 else stream


# -- held-out -------------------------------------------------------------------------------------
def heldout_batches(shards: ShardSet, tokenizer_dir: str, *, seq_len: int, micro_batch: int, max_batches: int,
                    heldout_percent: float, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """This rank's share of the held-out samples, packed like training data, in at most `max_batches`
    micro-batches; the same on every call.

    With at least `world_size` tars a rank reads tars rank, rank+world_size, ...; with fewer, every
    rank reads them all and takes every world_size-th held-out sample. No shuffling; an incomplete last
    sequence or batch is dropped. Ranks can so get different numbers of batches, none at all when
    their share holds fewer than `micro_batch * seq_len` tokens: a loop that runs a collective per
    batch (ZeRO-3 gathers parameters in every forward) must first agree on a common count, e.g. the
    minimum over ranks (all_reduce MIN).
    """
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank}: must be in [0, world_size={world_size})")
    tars, shared = shards.tars, len(shards.tars) < world_size
    if not shared:
        tars = tars[rank::world_size]

    def documents() -> Iterator[tuple[Cursor, str]]:
        for index, (_, text) in enumerate(iter_texts(shards, heldout_percent, "heldout", tars)):
            if not shared or index % world_size == rank:
                yield Cursor(), text

    batches: list[torch.Tensor] = []
    rows: list[np.ndarray] = []
    sequences = pack(documents(), load_tokenizer(tokenizer_dir), seq_len)
    while len(batches) < max_batches and (item := next(sequences, None)) is not None:
        rows.append(item[0])
        if len(rows) == micro_batch:
            batches.append(torch.from_numpy(np.stack(rows)))
            rows = []
    return batches
