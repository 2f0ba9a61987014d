"""Deduplication on Ray: exact groups, and near-duplicate clusters through an index of band keys.

Everything moves between Ray tasks as columnar records (dicts of numpy arrays), hash-partitioned, so
no step needs the whole corpus in one process: the driver only holds object references.

Near duplicates go through five map/reduce rounds:
1. band keys (MinHash bands, pHash chunks) are partitioned by key; rows sharing a key are candidates;
2. each candidate pair is verified by its true similarity (Jaccard of shingle sets, Hamming distance),
   joining the pair with each side's payload in turn, shard by shard;
3. connected components of the verified pairs, by alternating large-star / small-star rounds
   (Kiveris et al. 2014, "Connected Components in MapReduce and Beyond");
4. within each component, a greedy pass in keep-policy order: the best row is kept and every row with
   a verified edge to it is removed as its duplicate; rows with no edge to a kept row stay, so a chain
   A~B~C never removes C for a kept A it does not resemble.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np
import ray

from pipelines.curate.step import Duplicates, SignatureRef
from pipelines.runtime import filesystem

Records = dict[str, np.ndarray]
SHARD_BITS = 32
MIX = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread uint64 from a uint64 (vectorised)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def gid_shard(gid: np.ndarray) -> np.ndarray:
    return (gid >> SHARD_BITS).astype(np.int64)


def concat(parts: list[Records]) -> Records:
    """Records one after the other; {} when there are no rows (so `if not records` means empty)."""
    parts = [p for p in parts if p and size(p)]
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def take(records: Records, index: np.ndarray) -> Records:
    return {name: col[index] for name, col in records.items()}


def size(records: Records) -> int:
    return len(next(iter(records.values()))) if records else 0


def split(records: Records, part: np.ndarray, parts: int) -> list[Records]:
    """Records split by the partition number of each row (0..parts-1), order kept within a part."""
    if not records:
        return [{} for _ in range(parts)]
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [take(records, order[bounds[p]:bounds[p + 1]]) if bounds[p + 1] > bounds[p] else {}
            for p in range(parts)]


def partition_of(values: np.ndarray, parts: int) -> np.ndarray:
    return (mix64(values.astype(np.uint64)) % np.uint64(parts)).astype(np.int64)


def scatter(map_fn: Callable[..., list[Records]], inputs: list[Any], parts: int, *args: Any) -> list[list[Any]]:
    """Run `map_fn(input, parts, *args)` per input in Ray (each returns `parts` record sets); return,
    per part, the references of the pieces sent to it."""
    mapper = ray.remote(map_fn).options(num_returns=parts) if parts > 1 else ray.remote(map_fn)
    outs = [mapper.remote(item, parts, *args) for item in inputs]
    if parts == 1:
        return [[_Single(o) for o in outs]]  # type: ignore[list-item]
    return [[o[p] for o in outs] for p in range(parts)]


class _Single:
    """A one-part map returns its list; a reduce unwraps it (so one code path serves parts == 1)."""

    def __init__(self, ref: Any):
        self.ref = ref


def _resolve(pieces: list[Any]) -> list[Any]:
    return [p.ref if isinstance(p, _Single) else p for p in pieces]


def shuffle(map_fn: Callable[..., list[Records]], inputs: list[Any], parts: int,
            reduce_fn: Callable[..., Any], *reduce_args: Any, map_args: tuple = ()) -> list[Any]:
    """`scatter`, then `reduce_fn(*reduce_args, *pieces)` per part. Returns one reference per part."""
    reducer = ray.remote(reduce_fn)
    return [reducer.remote(*reduce_args, *_resolve(pieces)) for pieces in scatter(map_fn, inputs, parts, *map_args)]


def _unwrap(pieces: tuple[Any, ...]) -> list[Records]:
    # A one-part map returns a one-element list instead of a tuple of parts.
    return [p[0] if isinstance(p, list) else p for p in pieces]


def split_by(records: Records, parts: int, column: str, shard: bool = False) -> list[Records]:
    """Records split into `parts` by the hash of `column` (or by its gid's shard, when `shard`)."""
    if not records:
        return [{} for _ in range(parts)]
    values = gid_shard(records[column]) if shard else records[column]
    return split(records, partition_of(values, parts), parts)


def load_signature(ref: SignatureRef, names: tuple[str, ...]) -> Records:
    fs, path = filesystem(ref.path)
    with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
        return {name: data[name] for name in names}


# Exact duplicates --------------------------------------------------------------------------------

def _exact_map(ref: SignatureRef, parts: int) -> list[Records]:
    return split_by(load_signature(ref, ("hash", "gid", "key", "priority")), parts, "hash")


def _exact_reduce(drop_all: bool, *pieces: Records) -> Records:
    rec = concat(_unwrap(pieces))
    if not rec:
        return {}
    rec = take(rec, np.lexsort((rec["gid"], -rec["priority"], rec["hash"])))
    n = size(rec)
    first = np.r_[True, rec["hash"][1:] != rec["hash"][:-1]]
    starts = np.flatnonzero(first)
    group_start = starts[np.cumsum(first) - 1]
    group_size = np.diff(np.r_[starts, n])[np.cumsum(first) - 1]
    removed = np.flatnonzero((group_size > 1) if drop_all else ~first)
    kept = rec["key"][group_start[removed]]
    return {"gid": rec["gid"][removed], "cluster": kept, "kept_key": kept,
            "kept": np.full(len(removed), not drop_all), "similarity": np.ones(len(removed))}


def exact_duplicates(refs: list[SignatureRef], parts: int, drop_all: bool, reason: str) -> Duplicates:
    """Rows whose `hash` equals another's: all but the highest-priority one (or all, with drop_all)."""
    return _collect(shuffle(_exact_map, refs, parts, _exact_reduce, drop_all), reason)


def _collect(refs: list[Any], reason: str) -> Duplicates:
    rec = concat([r for r in ray.get(refs) if r])
    if not rec:
        return Duplicates(np.zeros(0, np.int64), [], [], [], [])
    rec = take(rec, np.argsort(rec["gid"]))
    kept_key = [k.decode() if kept else None for k, kept in zip(rec["kept_key"], rec["kept"], strict=True)]
    return Duplicates(rec["gid"], [c.decode() for c in rec["cluster"]], kept_key,
                      [reason] * size(rec), rec["similarity"].tolist())


# Near duplicates ---------------------------------------------------------------------------------

def near_duplicates(refs: list[SignatureRef], parts: int, similarity: Callable[..., np.ndarray],
                    min_similarity: float, drop_all: bool, reason: str, max_group_pairs: int = 4,
                    estimate_floor: float | None = None) -> Duplicates:
    """Rows with a verified `similarity(...) >= min_similarity` to a kept row, found through band keys.

    Each signature file holds `bands` (n x b uint64), `gid`, `key`, `priority` and the payload the
    similarity is computed from (`payload` flat plus `offsets`, n + 1 of them).
    `similarity(payload_a, offsets_a, payload_b, offsets_b)` scores aligned pairs. With
    `estimate_floor`, the files also hold `sig` (n x k MinHash values), and candidates whose share of
    equal values is below the floor are dropped before the exact check.
    """
    by_shard = {r.shard: r for r in refs}
    candidates = shuffle(_bands_map, refs, parts, _bands_reduce, max_group_pairs)
    if estimate_floor is not None:
        # Cheap first pass on the MinHash signatures: pairs whose estimated similarity is far below
        # the bar (3 standard errors) are not worth shipping their shingle sets for.
        with_sig = shuffle(split_by, candidates, parts, _attach_sig, by_shard, map_args=("a", True))
        candidates = shuffle(split_by, with_sig, parts, _estimate, by_shard, estimate_floor, map_args=("b", True))
    with_a = shuffle(split_by, candidates, parts, _attach_side, by_shard, map_args=("a", True))
    verified = shuffle(_split_joined, with_a, parts, _score_side, by_shard, similarity, min_similarity,
                       map_args=("b",))
    labels = connected_components(verified, parts)
    edges = scatter(split_by, verified, parts, "a")
    label_parts = scatter(split_by, labels, parts, "u")
    keyed = [ray.remote(_label_edges).remote(len(e), *_resolve(e), *_resolve(lp))
             for e, lp in zip(edges, label_parts, strict=True)]
    return _collect(shuffle(split_by, keyed, parts, _greedy_keep, drop_all, map_args=("root",)), reason)


def _bands_map(ref: SignatureRef, parts: int) -> list[Records]:
    rec = load_signature(ref, ("bands", "gid"))
    bands = rec["bands"]
    if bands.size == 0:
        return [{} for _ in range(parts)]
    n, b = bands.shape
    # A bucket is (band index, band value): fold the index in so equal values of different bands differ.
    with np.errstate(over="ignore"):
        bucket = mix64(bands ^ (np.arange(b, dtype=np.uint64) * MIX)[None, :]).ravel()
    return split_by({"bucket": bucket, "gid": np.repeat(rec["gid"], b)}, parts, "bucket")


def _bands_reduce(max_group_pairs: int, *pieces: Records) -> Records:
    """Candidate pairs (a < b, unique) of rows sharing a bucket: each row of a bucket meets its first
    `max_group_pairs` rows (so boilerplate shared by thousands of rows stays linear)."""
    rec = concat(_unwrap(pieces))
    if not rec:
        return {}
    rec = take(rec, np.lexsort((rec["gid"], rec["bucket"])))
    bucket, gid = rec["bucket"], rec["gid"]
    first = np.r_[True, bucket[1:] != bucket[:-1]]
    start = np.flatnonzero(first)[np.cumsum(first) - 1]
    position = np.arange(len(gid)) - start
    a_parts, b_parts = [], []
    for j in range(max_group_pairs):
        sel = np.flatnonzero(position > j)
        if not len(sel):
            break
        a_parts.append(gid[start[sel] + j])
        b_parts.append(gid[sel])
    if not a_parts:
        return {}
    return _unique_pairs(np.concatenate(a_parts), np.concatenate(b_parts))


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> Records:
    a, b = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    keep = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] & (a != b)
    return {"a": a[keep], "b": b[keep]}


def _attach_sig(by_shard: dict[int, SignatureRef], *pieces: Records) -> Records:
    pairs = concat(_unwrap(pieces))
    if not pairs:
        return {}
    shards = gid_shard(pairs["a"])
    out = []
    for shard in np.unique(shards):
        sel = take(pairs, np.flatnonzero(shards == shard))
        sig = load_signature(by_shard[int(shard)], ("gid", "sig"))
        out.append({**sel, "sig_a": sig["sig"][np.searchsorted(sig["gid"], sel["a"])]})
    return concat(out)


def _estimate(by_shard: dict[int, SignatureRef], floor: float, *pieces: Records) -> Records:
    pairs = concat(_unwrap(pieces))
    if not pairs:
        return {}
    shards = gid_shard(pairs["b"])
    out = []
    for shard in np.unique(shards):
        sel = take(pairs, np.flatnonzero(shards == shard))
        sig = load_signature(by_shard[int(shard)], ("gid", "sig"))
        sig_b = sig["sig"][np.searchsorted(sig["gid"], sel["b"])]
        ok = (sel["sig_a"] == sig_b).mean(axis=1) >= floor
        out.append({"a": sel["a"][ok], "b": sel["b"][ok]})
    return concat(out)


def _side(sig: Records, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Payloads (flat, offsets), keys and priorities of rows `gids` of one shard's signature."""
    row = np.searchsorted(sig["gid"], gids)
    starts, ends = sig["offsets"][row], sig["offsets"][row + 1]
    return (*_gather(sig["payload"], starts, ends), sig["key"][row], sig["priority"][row])


def _gather(flat: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated slices flat[starts[i]:ends[i]] and their offsets."""
    lengths = ends - starts
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return flat[index], offsets


def _attach_side(by_shard: dict[int, SignatureRef], *pieces: Records) -> Records:
    """Candidate pairs with a's payload, key and priority attached."""
    pairs = concat(_unwrap(pieces))
    if not pairs:
        return {}
    shards = gid_shard(pairs["a"])
    out = []
    for shard in np.unique(shards):
        sel = take(pairs, np.flatnonzero(shards == shard))
        sig = load_signature(by_shard[int(shard)], ("gid", "key", "priority", "payload", "offsets"))
        pay, off, key, prio = _side(sig, sel["a"])
        out.append({**sel, "key_a": key, "prio_a": prio, "pay_a": pay, "off_a": off})
    return _concat_joined(out)


def _split_joined(joined: Records, parts: int, column: str) -> list[Records]:
    """Split pair records that carry a variable-length `pay_a` (addressed by `off_a`)."""
    if not joined:
        return [{} for _ in range(parts)]
    part = partition_of(gid_shard(joined[column]), parts)
    out = []
    for p in range(parts):
        sel = np.flatnonzero(part == p)
        rec = {k: v[sel] for k, v in joined.items() if k not in ("pay_a", "off_a")}
        rec["pay_a"], rec["off_a"] = _gather(joined["pay_a"], joined["off_a"][sel], joined["off_a"][sel + 1])
        out.append(rec)
    return out


def _concat_joined(pieces: list[Records]) -> Records:
    """Concatenate pair records that carry a variable-length `pay_a`, rebasing `off_a`."""
    pieces = [p for p in pieces if p and size(p)]
    if not pieces:
        return {}
    out = concat([{k: v for k, v in p.items() if k not in ("pay_a", "off_a")} for p in pieces])
    bases = np.cumsum([0] + [len(p["pay_a"]) for p in pieces])
    out["pay_a"] = np.concatenate([p["pay_a"] for p in pieces])
    out["off_a"] = np.r_[np.concatenate([p["off_a"][:-1] + base for p, base in zip(pieces, bases, strict=False)]),
                         bases[-1]].astype(np.int64)
    return out


def _score_side(by_shard: dict[int, SignatureRef], similarity: Callable[..., np.ndarray],
                min_similarity: float, *pieces: Records) -> Records:
    """Verified edges: candidate pairs scored on both payloads, those at or above the bar."""
    joined = _concat_joined(_unwrap(pieces))
    if not joined:
        return {}
    shards = gid_shard(joined["b"])
    out = []
    for shard in np.unique(shards):
        rows = np.flatnonzero(shards == shard)
        sig = load_signature(by_shard[int(shard)], ("gid", "key", "priority", "payload", "offsets"))
        pay_b, off_b, key_b, prio_b = _side(sig, joined["b"][rows])
        pay_a, off_a = _gather(joined["pay_a"], joined["off_a"][rows], joined["off_a"][rows + 1])
        sim = similarity(pay_a, off_a, pay_b, off_b)
        ok = sim >= min_similarity
        out.append({"a": joined["a"][rows][ok], "b": joined["b"][rows][ok], "sim": sim[ok],
                    "key_a": joined["key_a"][rows][ok], "key_b": key_b[ok],
                    "prio_a": joined["prio_a"][rows][ok], "prio_b": prio_b[ok]})
    return concat(out)


# Connected components ----------------------------------------------------------------------------

def _star_map(edges: Records, parts: int, large: bool) -> list[Records]:
    if not edges:
        return [{} for _ in range(parts)]
    u, v = edges["u"], edges["v"]
    if large:  # every node sees all its neighbours
        src, dst = np.concatenate([u, v]), np.concatenate([v, u])
    else:  # every node sees its smaller neighbours
        src, dst = np.maximum(u, v), np.minimum(u, v)
    return split_by({"u": src, "v": dst}, parts, "u")


def _star_reduce(large: bool, *pieces: Records) -> Records:
    rec = concat(_unwrap(pieces))
    if not rec:
        return {}
    rec = take(rec, np.lexsort((rec["v"], rec["u"])))
    u, v = rec["u"], rec["v"]
    first = np.r_[True, u[1:] != u[:-1]]
    starts = np.flatnonzero(first)
    m = np.minimum(np.minimum.reduceat(v, starts), u[starts])[np.cumsum(first) - 1]
    if large:  # link each larger neighbour to the smallest node of the neighbourhood
        sel = v > u
        out_u, out_v = v[sel], m[sel]
    else:  # link the node and its smaller neighbours to the smallest of them
        out_u, out_v = np.concatenate([v, u[starts]]), np.concatenate([m, m[starts]])
        sel = out_u != out_v
        out_u, out_v = out_u[sel], out_v[sel]
    if not len(out_u):
        return {}
    pairs = np.unique(np.stack([out_u, out_v], axis=1), axis=0)
    return {"u": pairs[:, 0], "v": pairs[:, 1]}


def _fingerprint(edges: Records) -> tuple[int, int]:
    if not edges:
        return 0, 0
    with np.errstate(over="ignore"):
        h = mix64(edges["u"].astype(np.uint64) * MIX ^ edges["v"].astype(np.uint64))
    return len(h), int(np.bitwise_xor.reduce(h))


def connected_components(edge_refs: list[Any], parts: int) -> list[Any]:
    """Per part, `{"u": node, "v": root}` for the nodes of the verified edges (root: the smallest
    gid of the component; a root has no record of its own)."""
    to_uv = ray.remote(lambda e: {"u": e["a"], "v": e["b"]} if e else {})
    edges = [to_uv.remote(e) for e in edge_refs]
    fingerprint = ray.remote(_fingerprint)
    previous = None
    while True:
        edges = shuffle(_star_map, edges, parts, _star_reduce, True, map_args=(True,))
        edges = shuffle(_star_map, edges, parts, _star_reduce, False, map_args=(False,))
        prints = ray.get([fingerprint.remote(e) for e in edges])
        current = (sum(n for n, _ in prints), int(np.bitwise_xor.reduce(np.array([h for _, h in prints], np.uint64))))
        if current == previous:
            return edges
        previous = current


# Keep policy -------------------------------------------------------------------------------------

def _label_edges(n_edge_pieces: int, *pieces: Records) -> Records:
    """Verified edges (partitioned by a) joined with the root of a (labels partitioned by node)."""
    edges = concat(_unwrap(pieces[:n_edge_pieces]))
    labels = concat(_unwrap(pieces[n_edge_pieces:]))
    if not edges:
        return {}
    root = edges["a"].copy()
    if labels:
        order = np.argsort(labels["u"])
        nodes, roots = labels["u"][order], labels["v"][order]
        idx = np.minimum(np.searchsorted(nodes, edges["a"]), len(nodes) - 1)
        found = nodes[idx] == edges["a"]
        root[found] = roots[idx[found]]
    return {**edges, "root": root}


def _greedy_keep(drop_all: bool, *pieces: Records) -> Records:
    """Per component, in keep order: keep the best remaining row, remove its verified neighbours."""
    rec = concat(_unwrap(pieces))
    if not rec:
        return {}
    rec = take(rec, np.argsort(rec["root"], kind="stable"))
    out: dict[str, list] = {"gid": [], "cluster": [], "kept_key": [], "kept": [], "similarity": []}

    def remove(gid: int, cluster: bytes, kept_key: bytes | None, sim: float) -> None:
        out["gid"].append(gid), out["cluster"].append(cluster), out["similarity"].append(sim)
        out["kept_key"].append(kept_key or b""), out["kept"].append(kept_key is not None)

    bounds = np.flatnonzero(np.r_[True, rec["root"][1:] != rec["root"][:-1], True])
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        info: dict[int, tuple[float, bytes]] = {}
        adjacency: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for a, b, sim, ka, kb, pa, pb in zip(rec["a"][s:e].tolist(), rec["b"][s:e].tolist(),
                                              rec["sim"][s:e].tolist(), rec["key_a"][s:e], rec["key_b"][s:e],
                                              rec["prio_a"][s:e].tolist(), rec["prio_b"][s:e].tolist(), strict=True):
            info[a], info[b] = (pa, ka), (pb, kb)
            adjacency[a].append((b, sim))
            adjacency[b].append((a, sim))
        ranked = sorted(info, key=lambda g: (-info[g][0], g))
        cluster = info[ranked[0]][1]
        if drop_all:
            for g in ranked:
                remove(g, cluster, None, max(sim for _, sim in adjacency[g]))
            continue
        removed: set[int] = set()
        kept: set[int] = set()
        for g in ranked:
            if g in removed:
                continue
            kept.add(g)
            for other, sim in adjacency[g]:
                if other not in removed and other not in kept:
                    removed.add(other)
                    remove(other, cluster, info[g][1], sim)
    return {"gid": np.array(out["gid"], np.int64), "cluster": np.array(out["cluster"], dtype="S"),
            "kept_key": np.array(out["kept_key"], dtype="S"), "kept": np.array(out["kept"], bool),
            "similarity": np.array(out["similarity"], np.float64)}


# Similarities ------------------------------------------------------------------------------------

def jaccard(pay_a: np.ndarray, off_a: np.ndarray, pay_b: np.ndarray, off_b: np.ndarray) -> np.ndarray:
    """Jaccard similarity of aligned pairs of sorted, unique uint32 sets (offsets start at 0).

    Vectorised: each element becomes (pair << 32 | value), so all of one side's sets form one sorted
    array, and one `searchsorted` (cache-friendly, as its queries are sorted too) finds every
    intersection at once.
    """
    n = len(off_a) - 1
    la, lb = np.diff(off_a), np.diff(off_b)
    ka = (np.repeat(np.arange(n, dtype=np.uint64), la) << np.uint64(32)) | pay_a[off_a[0]:off_a[-1]].astype(np.uint64)
    kb = (np.repeat(np.arange(n, dtype=np.uint64), lb) << np.uint64(32)) | pay_b[off_b[0]:off_b[-1]].astype(np.uint64)
    if not len(kb):
        return np.zeros(n)
    idx = np.minimum(np.searchsorted(kb, ka), len(kb) - 1)
    hit = ka[kb[idx] == ka]
    inter = np.bincount((hit >> np.uint64(32)).astype(np.int64), minlength=n)
    union = la + lb - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def hamming_similarity(pay_a: np.ndarray, off_a: np.ndarray, pay_b: np.ndarray, off_b: np.ndarray) -> np.ndarray:
    """1 - Hamming distance / bits of aligned pairs of equal-size hashes (each a run of uint64 words)."""
    n = len(off_a) - 1
    if not n:
        return np.zeros(0)
    words = int(off_a[1] - off_a[0])
    x = (pay_a.reshape(n, words) ^ pay_b.reshape(n, words)).view(np.uint8)
    return 1.0 - np.unpackbits(x, axis=1).sum(axis=1) / (64.0 * words)
