"""Deduplication steps: exact (text, image bytes or both), MinHash near-duplicate text, pHash images.

Each computes a per-row signature in the shard tasks and hands the signatures to `dedup.py`, which
finds the duplicates on Ray and applies the keep policy.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from pipelines.curate import dedup
from pipelines.curate.step import DedupParams, DedupStep, Duplicates, SignatureRef, threshold

WORD = re.compile(r"\w+")
U64 = np.uint64


def normalize(text: str) -> str:
    """Lowercase words joined by single spaces: punctuation, case and spacing do not make copies differ."""
    return " ".join(WORD.findall(text.lower()))


class ExactDedupParams(DedupParams):
    match: Literal["text", "image", "image+text"] = Field("text", description=(
        "What must be equal: the normalised text, the image bytes (their sha256), or both (caption-image pairs)."))
    normalize: bool = Field(True, description="Compare texts after lowercasing and dropping punctuation.")


class ExactDedup(DedupStep):
    """Drop exact copies: of the text (after normalisation), of the image, or of the caption-image pair."""

    name = "exact_dedup"
    Params = ExactDedupParams
    params: ExactDedupParams
    reason = "exact_duplicate"

    def required_columns(self) -> tuple[str, ...]:
        need = {"text": ("text",), "image": ("image",), "image+text": ("image", "text")}[self.params.match]
        return need + super().required_columns()[len(self.columns):]

    def signature(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        parts = []
        if "image" in self.params.match:
            if "sha256" in batch:
                parts.append(batch["sha256"].fillna("").astype(str))
            else:
                parts.append(batch["image"].map(lambda b: hashlib.sha256(b or b"").hexdigest()))
        if "text" in self.params.match:
            text = batch["text"].fillna("")
            parts.append(text.map(normalize) if self.params.normalize else text)
        joined = parts[0] if len(parts) == 1 else parts[0] + "\x00" + parts[1]
        digest = joined.map(lambda s: hashlib.blake2b(s.encode(), digest_size=8).digest())
        return {"hash": np.frombuffer(b"".join(digest), dtype=U64) if len(digest) else np.zeros(0, U64)}

    def find_duplicates(self, signatures: list[SignatureRef], parts: int) -> Duplicates:
        return dedup.exact_duplicates(signatures, parts, self.params.keep == "none", self.reason)


class MinHashParams(DedupParams):
    ngram: int = Field(5, ge=1, description="Words per shingle.")
    bands: int = Field(14, ge=1, description="LSH bands.")
    rows: int = Field(8, ge=1, description="MinHash values per band (permutations = bands x rows).")
    jaccard: float = threshold(0.7, gt=0, le=1, description=(
        "Candidate pairs are joined only if the true Jaccard similarity of their shingle sets reaches this."))
    max_group_pairs: int = Field(4, ge=1, description=(
        "In an LSH bucket larger than this, each row is compared with this many rows only."))
    seed: int = Field(1, description="Seed of the hash permutations.")


class MinHashDedup(DedupStep):
    """Near-duplicate documents: MinHash LSH over word n-grams, every candidate verified by exact Jaccard."""

    name = "minhash_dedup"
    Params = MinHashParams
    params: MinHashParams
    reason = "near_duplicate"

    def signature(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        p = self.params
        shingles, offsets = shingle_sets(batch["text"].fillna("").tolist(), p.ngram)
        sig = minhash(shingles, offsets, p.bands * p.rows, p.seed)
        bands = band_hashes(sig, p.bands, p.rows)
        bands[np.diff(offsets) == 0] = _unique_bands(batch, p.bands)[np.diff(offsets) == 0]
        return {"bands": bands, "payload": shingles, "offsets": offsets, "sig": sig}

    def find_duplicates(self, signatures: list[SignatureRef], parts: int) -> Duplicates:
        p = self.params
        k = p.bands * p.rows
        floor = p.jaccard - 3 * (p.jaccard * (1 - p.jaccard) / k) ** 0.5
        return dedup.near_duplicates(signatures, parts, dedup.jaccard, p.jaccard, p.keep == "none", self.reason,
                                     p.max_group_pairs, estimate_floor=floor if floor > 0 else None)


def _unique_bands(batch: pd.DataFrame, bands: int) -> np.ndarray:
    # Empty documents: band values of their own (from the key), so they never meet as candidates.
    keys = batch["key"].astype(str).map(lambda k: int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest()))
    base = np.array(keys.tolist(), dtype=U64)
    return dedup.mix64(base[:, None] + np.arange(bands, dtype=U64)[None, :]) if len(base) else np.zeros((0, bands), U64)


def shingle_sets(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per document, the sorted unique 32-bit hashes of its normalised word n-grams (a document
    shorter than n words is one shingle). Returns (flat uint32 hashes, offsets of len(texts) + 1).

    32 bits are plenty for sets of a few thousand shingles (two distinct shingles of a pair of
    documents share a hash with odds of about 1 in 4,000 per pair), and halve what moves between tasks.
    """
    words_per_doc = [WORD.findall(t.lower()) for t in texts]
    counts = np.array([len(w) for w in words_per_doc], dtype=np.int64)
    words = np.array([w for ws in words_per_doc for w in ws], dtype=object)
    if not len(words):
        return np.zeros(0, np.uint32), np.zeros(len(texts) + 1, np.int64)
    # pandas' hash_array: a fixed-key SipHash in C, so equal words hash equally in every process.
    h = pd.util.hash_array(words, categorize=True)
    doc = np.repeat(np.arange(len(texts)), counts)
    total = len(h)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    # A window starting at i covers words i..i+n-1 and must stay inside its document; a document
    # shorter than n words keeps one window of all its words.
    window = np.minimum(n, counts[doc])
    pos = np.arange(total) - starts[doc]
    valid = np.flatnonzero((pos + window <= counts[doc]) & ((pos == 0) | (counts[doc] >= n)))
    acc = np.zeros(len(valid), dtype=U64)
    with np.errstate(over="ignore"):
        for j in range(n):
            part = np.where(j < window[valid], h[np.minimum(valid + j, total - 1)], U64(0))
            acc = (acc ^ part) * U64(0x100000001B3 + 2 * j) + U64(j + 1)
    # One sort of (document << 32 | hash) groups each document's hashes in order; then unique.
    keys = np.unique((doc[valid].astype(U64) << U64(32)) | (dedup.mix64(acc) >> U64(32)))
    owners = (keys >> U64(32)).astype(np.int64)
    offsets = np.r_[0, np.cumsum(np.bincount(owners, minlength=len(texts)))].astype(np.int64)
    return (keys & U64(0xFFFFFFFF)).astype(np.uint32), offsets


def minhash(shingles: np.ndarray, offsets: np.ndarray, permutations: int, seed: int) -> np.ndarray:
    """MinHash signatures (docs x permutations, uint32) with multiply-shift hashing: h -> (a*h + b) >> 32,
    a universal family that numpy evaluates without a modulo. Empty documents get all-max rows."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=permutations, dtype=np.uint64) * U64(2) + U64(1)
    b = rng.integers(0, 2**63, size=permutations, dtype=np.uint64)
    docs = len(offsets) - 1
    sig = np.full((docs, permutations), np.iinfo(np.uint32).max, dtype=np.uint32)
    nonempty = np.flatnonzero(np.diff(offsets) > 0)
    if not len(nonempty):
        return sig
    starts = offsets[nonempty]
    x = shingles.astype(U64)[:, None]
    step = max(1, (1 << 23) // max(1, len(shingles)))  # keep the working block near 64 MiB
    block = np.empty((len(shingles), step), dtype=U64)
    with np.errstate(over="ignore"):
        for k in range(0, permutations, step):
            width = min(step, permutations - k)
            out = block[:, :width]
            np.multiply(x, a[None, k:k + width], out=out)  # in place: no temporaries of the block's size
            out += b[None, k:k + width]
            out >>= U64(32)
            sig[nonempty, k:k + width] = np.minimum.reduceat(out, starts, axis=0)
    return sig


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per band from its `rows` MinHash values."""
    out = np.zeros((sig.shape[0], bands), dtype=U64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            out = dedup.mix64(out ^ sig[:, r::rows][:, :bands].astype(U64) * U64(2 * r + 1))
    return out


class PHashParams(DedupParams):
    hash: Literal["phash", "dhash"] = Field("phash", description="Perceptual hash (imagehash's phash or dhash).")
    hash_size: int = Field(8, ge=4, le=32, description=(
        "Side of the hash grid: 8 gives 64-bit hashes; 16 gives 256 bits, which tell overlapping crops "
        "of one photo from resized copies far better."))
    max_distance: int = threshold(4, ge=0, description=(
        "Images whose hashes differ in at most this many bits are duplicates."))
    index_distance: int | None = Field(None, ge=0, description=(
        "Largest max_distance the index finds every pair for (default: max_distance): the hash is cut "
        "into index_distance + 1 bands, so two hashes within that distance share a band (pigeonhole)."))

    @model_validator(mode="after")
    def _index_covers_threshold(self) -> PHashParams:
        if self.max_distance >= self.hash_size ** 2:
            raise ValueError(f"max_distance must be below the hash's {self.hash_size ** 2} bits")
        if self.index_distance is None:
            # The index shapes the signatures, which are cached without thresholds: it takes its own value.
            self.index_distance = self.max_distance
        elif self.max_distance > self.index_distance:
            raise ValueError("max_distance must not exceed index_distance")
        return self


class PHashDedup(DedupStep):
    """Near-duplicate images (resized, re-encoded): perceptual hashes within a Hamming distance,
    found through a band index, never by comparing all pairs."""

    name = "phash_dedup"
    columns: ClassVar[tuple[str, ...]] = ("image",)
    Params = PHashParams
    params: PHashParams
    reason = "near_duplicate_image"

    def signature(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        p = self.params
        bits = np.array([image_hash_bits(b, p.hash, p.hash_size) for b in batch["image"]], dtype=np.uint8)
        bits = bits.reshape(len(batch), p.hash_size ** 2)
        words = np.packbits(bits, axis=1)
        words = np.pad(words, ((0, 0), (0, -words.shape[1] % 8))).view(U64)  # whole uint64 words
        bands = p.index_distance + 1
        return {"bands": bit_bands(bits, bands), "payload": words.ravel(),
                "offsets": np.arange(len(batch) + 1, dtype=np.int64) * words.shape[1]}

    def find_duplicates(self, signatures: list[SignatureRef], parts: int) -> Duplicates:
        bits = self.params.hash_size ** 2
        # Band buckets hold only rows that agree on a whole band, so every pair in them is compared.
        return dedup.near_duplicates(signatures, parts, dedup.hamming_similarity,
                                     1.0 - self.params.max_distance / bits, self.params.keep == "none",
                                     self.reason, max_group_pairs=1 << 30)


def image_hash_bits(data: bytes | None, kind: str = "phash", hash_size: int = 8) -> np.ndarray:
    """The perceptual hash of an encoded image as hash_size**2 bits (imagehash; Pillow's draft mode
    decodes JPEGs at a reduced size first). An undecodable image gets random bits: it matches nothing."""
    import imagehash
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data or b"")) as im:
            im.draft("L", (8 * hash_size, 8 * hash_size))
            h = (imagehash.phash if kind == "phash" else imagehash.dhash)(im.convert("L"), hash_size=hash_size)
        return h.hash.ravel().astype(np.uint8)
    except (UnidentifiedImageError, OSError, ValueError):
        return np.random.default_rng().integers(0, 2, hash_size ** 2, dtype=np.uint8)


def bit_bands(bits: np.ndarray, bands: int) -> np.ndarray:
    """Each row's bits cut into `bands` contiguous ranges, each range as one uint64 value."""
    edges = np.linspace(0, bits.shape[1], bands + 1).astype(int)
    out = np.zeros((len(bits), bands), dtype=U64)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        packed = np.packbits(bits[:, lo:hi], axis=1)
        for j in range(packed.shape[1]):  # fold the band's bytes into one value
            out[:, i] = dedup.mix64(out[:, i] ^ packed[:, j].astype(U64))
    return out
