"""The curation step API: what a data engineer writes to add a filter, a scorer or a deduplicator.

A step is one small class. Row steps work on one batch of rows at a time (a pandas DataFrame: the
shard's metadata columns plus `key`, `text` (the document, or an image's caption) and, for image
shards, `image` (encoded bytes)), in three optional parts, score first and decide after (Dolma's
taggers, datatrove's filters):

- `score(batch)` returns new columns (a dict or DataFrame). Scores must depend on each row alone:
  they are cached per row, so changing a threshold and rerunning does not compute them again.
- `transform(batch)` returns the batch with columns rewritten (e.g. PII redaction).
- `drop(batch)` returns, per row, the reason to drop it or None to keep it, from the scores and the
  thresholds in `self.params`. Use `reasons(...)` to build it.

Parameters are a pydantic model (`Params`) validated from the YAML config; fields made with
`threshold(...)` only feed `drop`, so they are left out of the score cache's key. What `score` (and a
dedup's `signature` and `priority`) may read is checked: reading a threshold there is an error, since a
cached score would go stale when the threshold changes. A step's cache identity is also its code: the
source of the modules defining its class and its bases (`code_digest`), so editing a step recomputes it.

    class MinWords(Step):
        '''Drop documents with fewer than `min_words` words.'''

        name = "min_words"

        class Params(StepParams):
            min_words: int = threshold(50, ge=0)

        def score(self, batch):
            return {"words": batch["text"].str.split().str.len()}

        def drop(self, batch):
            return reasons(batch["words"] < self.params.min_words, "too_few_words")

Deduplication needs every shard at once, so a `DedupStep` works in two phases: `signature(batch)`
per shard (hashes, MinHash signatures) and `find_duplicates(...)` over all of them on Ray. Any decision
over all rows fits there: a `DedupStep` may also `score` its rows (cached, and kept as columns) before its
signature, which is how `clip_score` keeps the top fraction of all scores.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import marshal
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.errors import PipelineError


class StepParams(BaseModel):
    """Base of a step's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def thresholds(cls) -> set[str]:
        """Names of the fields made with `threshold(...)`: they only decide keep/drop."""
        return {name for name, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("threshold")}

    def score_digest(self) -> str:
        """sha256 of the parameters that change scores (all but thresholds)."""
        blob = json.dumps(self.model_dump(mode="json", exclude=self.thresholds()), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def threshold(default: Any, **kwargs: Any) -> Any:
    """A parameter that only decides keep/drop from scores (changing it reuses cached scores)."""
    return Field(default, json_schema_extra={"threshold": True}, **kwargs)


def reasons(*rules: tuple[Any, str] | Any) -> pd.Series:
    """Per-row drop reasons from (mask, reason) rules: the first rule that matches a row names it.

    `reasons(mask, "too_short")` or `reasons((m1, "too_short"), (m2, "too_long"))`; None keeps the row.
    """
    if len(rules) == 2 and isinstance(rules[1], str):
        rules = (tuple(rules),)  # type: ignore[assignment]
    out: pd.Series | None = None
    for mask, reason in rules:  # type: ignore[misc]
        mask = pd.Series(mask).fillna(False).astype(bool)
        if out is None:
            out = pd.Series([None] * len(mask), index=mask.index, dtype=object)
        out = out.where(~(mask & out.isna()), reason)
    return out if out is not None else pd.Series([], dtype=object)


class Step:
    """Base of every curation step. Subclasses set `name` and override any of score/transform/drop."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[StepParams]] = StepParams
    # Columns the step reads; checked against the shards (and earlier steps' `adds`) before anything runs.
    columns: ClassVar[tuple[str, ...]] = ("text",)
    # Columns its score() adds; None: not declared (later steps' needs are then checked as each batch runs).
    adds: ClassVar[tuple[str, ...] | None] = None
    # What one copy of the step needs; Ray places the shard tasks accordingly.
    num_cpus: ClassVar[float] = 1
    num_gpus: ClassVar[float] = 0

    def __init__(self, params: StepParams | None = None):
        self.params = params if params is not None else self.Params()

    def required_columns(self) -> tuple[str, ...]:
        """Columns the shards must have (or an earlier step must add) for this step to run."""
        return self.columns

    def added_columns(self) -> tuple[str, ...] | None:
        """Columns score() adds (None when the step does not say)."""
        return () if type(self).score is Step.score else self.adds

    def score(self, batch: pd.DataFrame) -> pd.DataFrame | dict[str, Any] | None:
        return None

    def transform(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch

    def drop(self, batch: pd.DataFrame) -> pd.Series | None:
        return None


class ThresholdReadInScore(PipelineError):
    """A step's score (or signature, or priority) read a parameter declared as a threshold."""


class _ScoringParams:
    """A step's parameters as its scoring code sees them: every field but the thresholds."""

    def __init__(self, params: StepParams, step: str):
        self._params, self._step, self._thresholds = params, step, params.thresholds()

    def __getattr__(self, name: str) -> Any:
        if name in self._thresholds:
            raise ThresholdReadInScore(
                f"step {self._step}: its scoring code reads `{name}`, declared with threshold(...); scores are "
                f"cached without thresholds, so they would go stale when `{name}` changes: declare it with "
                "Field(...) instead")
        value = getattr(self._params, name)
        if name in ("model_dump", "model_dump_json"):
            return functools.partial(_without, value, self._thresholds)
        return value


def _without(dump: Any, thresholds: set[str], *args: Any, exclude: Any = None, **kwargs: Any) -> Any:
    return dump(*args, exclude=set(exclude or ()) | thresholds, **kwargs)


@contextlib.contextmanager
def scoring(step: Step) -> Iterator[Step]:
    """The step with `params` hiding its thresholds, for what is cached per row: `score`, and a dedup's
    `signature` and `priority`. Reading a threshold there raises ThresholdReadInScore."""
    params = step.params
    step.params = _ScoringParams(params, step.name)  # type: ignore[assignment]
    try:
        yield step
    finally:
        step.params = params


def code_digest(cls: type) -> str:
    """sha256 of the source of every module that defines `cls` or one of its bases (plugins included):
    a step's cache identity, so that editing its code recomputes what it computed."""
    h = hashlib.sha256()
    for name in sorted({c.__module__ for c in cls.__mro__ if c is not object}):
        h.update(f"{name}\n".encode())
        h.update(_module_source(name, [c for c in cls.__mro__ if c.__module__ == name]))
    return h.hexdigest()


def _module_source(name: str, classes: list[type]) -> bytes:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if path and path.endswith(".py"):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            pass
    try:
        return "".join(inspect.getsource(c) for c in classes).encode()
    except (OSError, TypeError):
        # No source (a class made at run time): its methods' bytecode, which changes with the code.
        return b"".join(marshal.dumps(v.__code__) for c in classes for v in vars(c).values()
                        if hasattr(v, "__code__"))


@dataclass
class Duplicates:
    """What a deduplicator found: per removed row (by gid), its cluster, the key of the row kept for
    it (None when every copy goes), the reason and the similarity to the kept row."""

    gid: np.ndarray
    cluster: list[str]
    kept_key: list[str | None]
    reason: list[str]
    similarity: list[float]


@dataclass(frozen=True)
class SignatureRef:
    """One shard's signature file: an npz with the step's arrays plus `gid` (shard << 32 | row),
    `key` and `priority` (the keep policy's rank: higher is kept first, then the smaller gid)."""

    shard: int
    path: str
    rows: int


class DedupParams(StepParams):
    keep: Literal["first", "longest", "highest", "none"] = Field("first", description=(
        "Which copy stays: the first in input order, the longest text, the highest `keep_column`, "
        "or none (every copy is dropped)."))
    keep_column: str | None = Field(None, description="Score column for keep: highest.")

    @model_validator(mode="after")
    def _column_for_highest(self) -> DedupParams:
        if self.keep == "highest" and not self.keep_column:
            raise ValueError("keep: highest needs keep_column")
        return self


class DedupStep(Step):
    """A step that needs all rows at once. `signature(batch)` runs per shard; its arrays (one value
    or row per batch row, in batch order) are saved with the shard's work files; `find_duplicates`
    runs on the driver over every shard's file and launches Ray tasks itself."""

    Params: ClassVar[type[StepParams]] = DedupParams
    params: DedupParams

    def signature(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def required_columns(self) -> tuple[str, ...]:
        extra = (self.params.keep_column,) if self.params.keep == "highest" else ()
        return self.columns + extra

    def priority(self, batch: pd.DataFrame) -> np.ndarray:
        if self.params.keep == "longest":
            return batch["text"].fillna("").str.len().to_numpy(np.float64)
        if self.params.keep == "highest":
            return pd.to_numeric(batch[self.params.keep_column], errors="coerce").fillna(-np.inf).to_numpy(np.float64)
        return np.zeros(len(batch))

    def find_duplicates(self, signatures: list[SignatureRef], parts: int) -> Duplicates:
        raise NotImplementedError
