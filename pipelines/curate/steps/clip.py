"""Steps that embed with a CLIP model: `clip_score` (image-caption agreement) and `semantic_dedup` (SemDeDup).

The model is a registered one (`models:/NAME@ALIAS`, pinned to its version when the step is built, so a moved
alias never mixes two models' scores in one cache) or a Hugging Face folder written by `ClipBundle.save`. Each
worker process loads it once and keeps it (`clip_bundle`); it runs on CUDA where the worker sees a GPU.
Shard tasks ask Ray for a GPU when the cluster has one (`num_gpus`, default: auto).

Both decide over every row at once, so both are `DedupStep`s: `clip_score` scores each row (cached per row and
kept as the `clip_score` column) and drops below a threshold or outside the top fraction of all scores, as
DataComp's CLIP score filter does (Gadre et al. 2023); `semantic_dedup` clusters the embeddings with k-means
and, within each cluster, removes rows closer than `1 - eps` in cosine to a row it keeps (Abbas et al. 2023).
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from pipelines.curate import dedup
from pipelines.curate.step import DedupParams, DedupStep, Duplicates, SignatureRef, StepParams, threshold
from pipelines.errors import PipelineError


class ClipModelParams(StepParams):
    model: str = Field(description="A registered CLIP model (models:/NAME@ALIAS or /VERSION) or a model folder.")
    batch_size: int = Field(64, ge=1, description="Rows per model call.")
    num_gpus: float | None = Field(None, ge=0, description=(
        "GPUs per shard task; default 1 when the Ray cluster has a GPU, else 0."))


@functools.lru_cache(maxsize=2)
def clip_bundle(model: str, tracking_uri: str | None) -> Any:
    """The CLIP model `model`, loaded once per process (a Ray worker runs many shard tasks)."""
    from pipelines.train.clip_model import load_clip

    if tracking_uri:  # Ray workers may have started before the driver's environment pointed MLflow here
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return load_clip(model)


def decode_images(data: pd.Series) -> list[Any]:
    """Encoded images as PIL RGB images; None where the bytes do not decode."""
    from PIL import Image

    out = []
    for b in data:
        try:
            with Image.open(io.BytesIO(b or b"")) as im:
                out.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError):
            out.append(None)
    return out


class ClipModelStep(DedupStep):
    """What both CLIP steps share: the pinned model and how they embed images and captions."""

    params: Any
    _tracking_uri: str | None = None

    def __init__(self, params: StepParams | None = None):
        super().__init__(params)
        model = self.params.model
        if model.startswith("models:/"):
            from pipelines.train.registry import configure_tracking, resolve_version

            self._tracking_uri = configure_tracking()
            name, version = resolve_version(model)
            self.params = self.params.model_copy(update={"model": f"models:/{name}/{version}"})
        elif not (Path(model) / "config.json").is_file():
            raise PipelineError(f"{self.name}: model {model!r} is neither models:/NAME@ALIAS nor a model folder")
        else:
            self.params = self.params.model_copy(update={"model": str(Path(model).absolute())})

    @property
    def num_gpus(self) -> float:  # type: ignore[override]
        if self.params.num_gpus is not None:
            return self.params.num_gpus
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def bundle(self) -> Any:
        return clip_bundle(self.params.model, self._tracking_uri)

    def embed_images(self, batch: pd.DataFrame) -> np.ndarray:
        """Image embeddings (rows of zeros for images that do not decode: similar to nothing)."""
        bundle = self.bundle()
        images = decode_images(batch["image"])
        ok = [i for i, im in enumerate(images) if im is not None]
        out = np.zeros((len(batch), bundle.model.config.projection_dim), np.float32)
        if ok:
            out[ok] = bundle.embed_images([images[i] for i in ok], self.params.batch_size)
        return out

    def embed_texts(self, batch: pd.DataFrame) -> np.ndarray:
        return self.bundle().embed_texts(batch["text"].fillna("").astype(str).tolist(), self.params.batch_size)

    def priority(self, batch: pd.DataFrame) -> np.ndarray:
        return np.zeros(len(batch))


class ClipScoreParams(ClipModelParams):
    min_score: float | None = threshold(None, ge=-1, le=1, description="Drop rows scoring below this cosine.")
    fraction: float | None = threshold(None, gt=0, le=1, description=(
        "Keep only this top fraction of all rows by score (DataComp's best CLIP filter keeps 0.3)."))


class ClipScore(ClipModelStep):
    """Score `clip_score`, the cosine of each image's and its caption's embeddings, and drop rows below
    `min_score` or outside the top `fraction` of all rows' scores (both may be set; neither: score only).

    Reasons: `clip_score_unknown` (the image does not decode), `low_clip_score`, `clip_score_below_top_fraction`.
    """

    name = "clip_score"
    adds = ("clip_score",)
    columns: ClassVar[tuple[str, ...]] = ("image", "text")
    Params = ClipScoreParams
    params: ClipScoreParams

    def required_columns(self) -> tuple[str, ...]:
        return self.columns

    def score(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        images, texts = self.embed_images(batch), self.embed_texts(batch)
        score = (images * texts).sum(1)
        score[~images.any(1)] = np.nan
        return {"clip_score": score}

    def signature(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"score": batch.get("clip_score", pd.Series([], dtype=float)).to_numpy(np.float64)}

    def find_duplicates(self, signatures: list[SignatureRef], parts: int) -> Duplicates:
        rec = dedup.concat([dedup.load_signature(ref, ("score", "gid")) for ref in signatures if ref.rows])
        score = rec.get("score", np.zeros(0))
        why = np.full(len(score), None, dtype=object)
        known = ~np.isnan(score)
        if self.params.min_score is not None:
            why[known & (score < self.params.min_score)] = "low_clip_score"
        if self.params.fraction is not None and known.any():
            cut = np.quantile(score[known], 1 - self.params.fraction)  # as DataComp: keep score >= quantile
            why[known & (score < cut) & (why == None)] = "clip_score_below_top_fraction"  # noqa: E711
        why[~known] = "clip_score_unknown"
        gone = np.flatnonzero(why != None)  # noqa: E711
        return Duplicates(rec["gid"][gone] if len(gone) else np.zeros(0, np.int64), [None] * len(gone),
                          [None] * len(gone), why[gone].tolist(), score[gone].tolist())


class SemanticDedupParams(DedupParams, ClipModelParams):
    keep: Literal["farthest", "first", "longest", "highest", "none"] = Field("farthest", description=(
        "Which copy stays: the one farthest from its cluster's centroid (SemDeDup's choice: the least "
        "prototypical), the first in input order, the longest caption, the highest `keep_column`, or none."))
    embed: Literal["image", "text"] = Field("image", description="Deduplicate the images or the captions.")
    eps: float = threshold(0.05, gt=0, lt=1, description="Rows whose cosine exceeds 1 - eps are duplicates.")
    clusters: int | None = threshold(None, ge=1, description=(
        "k-means clusters (default: one per 1,000 rows); duplicates are only looked for within a cluster."))
    seed: int = threshold(0, description="Seed of k-means.")


class SemanticDedup(ClipModelStep):
    """Near-duplicate images (or captions) by meaning: SemDeDup over CLIP embeddings. Within each k-means
    cluster, rows are taken in keep order and each is removed if its cosine to a row already kept exceeds
    `1 - eps` (so a chain A~B~C never removes C for a kept A it does not resemble)."""

    name = "semantic_dedup"
    Params = SemanticDedupParams
    params: SemanticDedupParams
    reason = "semantic_duplicate"

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("image",) if self.params.embed == "image" else ("text",)

    def priority(self, batch: pd.DataFrame) -> np.ndarray:
        return np.zeros(len(batch)) if self.params.keep == "farthest" else DedupStep.priority(self, batch)

    def signature(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        if not len(batch):
            return {"embedding": np.zeros((0, 0), np.float32)}
        return {"embedding": self.embed_images(batch) if self.params.embed == "image" else self.embed_texts(batch)}

    def find_duplicates(self, signatures: list[SignatureRef], parts: int) -> Duplicates:
        import ray

        rec = ray.get(ray.remote(semantic_duplicates).remote(
            [ref for ref in signatures if ref.rows], self.params.model_dump(mode="json")))
        return Duplicates(rec["gid"], rec["cluster"], rec["kept_key"], [self.reason] * len(rec["gid"]),
                          rec["similarity"])


def semantic_duplicates(refs: list[SignatureRef], params: dict[str, Any]) -> dict[str, Any]:
    """SemDeDup over every shard's embeddings (one Ray task): k-means, then a greedy keep per cluster."""
    p = SemanticDedupParams.model_validate(params)
    rec = dedup.concat([dedup.load_signature(ref, ("embedding", "gid", "key", "priority")) for ref in refs])
    out: dict[str, list] = {"gid": [], "cluster": [], "kept_key": [], "similarity": []}
    if not rec:
        return out | {"gid": np.zeros(0, np.int64)}
    emb, gid, key = rec["embedding"], rec["gid"], rec["key"]
    k = min(len(emb), p.clusters or max(1, round(len(emb) / 1000)))
    labels = np.zeros(len(emb), np.int64)
    if k > 1:
        from sklearn.cluster import MiniBatchKMeans

        labels = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=p.seed, batch_size=4096).fit_predict(emb)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        e = emb[members]
        if p.keep == "farthest":
            centroid = e.mean(0)
            rank = e @ (centroid / max(float(np.linalg.norm(centroid)), 1e-12))  # ascending: farthest first
        else:
            rank = -rec["priority"][members]
        members = members[np.lexsort((gid[members], rank))]
        sim = emb[members] @ emb[members].T
        np.fill_diagonal(sim, -1.0)
        close = sim > 1 - p.eps
        kept: list[int] = []
        for i in range(len(members)):
            if p.keep == "none":
                if close[i].any():
                    first = int(np.flatnonzero(close[i] | (np.arange(len(members)) == i))[0])
                    out["gid"].append(gid[members[i]]), out["cluster"].append(key[members[first]].decode())
                    out["kept_key"].append(None), out["similarity"].append(float(sim[i].max()))
                continue
            best = int(np.argmax(sim[i, kept])) if kept else -1
            if best >= 0 and close[i, kept[best]]:
                kept_key = key[members[kept[best]]].decode()
                out["gid"].append(gid[members[i]]), out["cluster"].append(kept_key)
                out["kept_key"].append(kept_key), out["similarity"].append(float(sim[i, kept[best]]))
            else:
                kept.append(i)
    order = np.argsort(np.array(out["gid"], np.int64), kind="stable")
    return {"gid": np.array(out["gid"], np.int64)[order], **{name: [out[name][i] for i in order]
                                                             for name in ("cluster", "kept_key", "similarity")}}
