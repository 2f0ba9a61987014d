"""Document length bounds, in whitespace-separated words and in characters."""

from __future__ import annotations

import math

import pandas as pd

from pipelines.curate.step import Step, StepParams, reasons, threshold


class Length(Step):
    """Drop documents with too few or too many words or characters (a bound of None is no bound)."""

    name = "length"
    adds = ("length_words", "length_chars")

    class Params(StepParams):
        min_words: int | None = threshold(1, ge=0)
        max_words: int | None = threshold(None, ge=0)
        min_chars: int | None = threshold(None, ge=0)
        max_chars: int | None = threshold(None, ge=0)

    def score(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch["text"].fillna("").tolist()
        # A list comprehension beats `.str.split().str.len()` on Arrow strings by about 3x.
        return pd.DataFrame({"length_words": [len(t.split()) for t in texts],
                             "length_chars": [len(t) for t in texts]}, index=batch.index)

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        p, words, chars = self.params, batch["length_words"], batch["length_chars"]
        return reasons(
            (words < _bound(p.min_words, -math.inf), "too_few_words"),
            (words > _bound(p.max_words, math.inf), "too_many_words"),
            (chars < _bound(p.min_chars, -math.inf), "too_few_chars"),
            (chars > _bound(p.max_chars, math.inf), "too_many_chars"),
        )


def _bound(value: int | None, unbounded: float) -> float:
    return unbounded if value is None else value
