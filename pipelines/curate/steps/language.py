"""Language identification with py3langid (its model ships inside the package: no download)."""

from __future__ import annotations

from functools import cache

import pandas as pd
from pydantic import Field

from pipelines.curate.step import Step, StepParams, reasons, threshold


@cache
def _identifier():
    """One identifier per process: loading the model takes about half a second."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class Language(Step):
    """Score each document's language (ISO 639-1 code) and its probability; keep the documents in
    `languages` (None: any) whose probability is at least `min_score` (0.65, datatrove's
    LanguageFilter default). Empty documents get language None and score 0."""

    name = "language"
    adds = ("language", "language_score")

    class Params(StepParams):
        languages: list[str] | None = threshold(None)
        min_score: float = threshold(0.65, ge=0, le=1)
        # py3langid walks the bytes in Python, so cost grows with length: 2000 characters
        # (300-odd words) settle the language of a document and keep the step at ~2500 docs/s.
        max_chars: int = Field(2000, gt=0)

    def score(self, batch: pd.DataFrame) -> pd.DataFrame:
        identifier, n = _identifier(), self.params.max_chars
        languages, scores = [], []
        for text in batch["text"].fillna("").tolist():
            # Like datatrove, classify the text without its line breaks.
            text = text[:n].replace("\n", " ")
            if text.strip():
                language, score = identifier.classify(text)
            else:
                language, score = None, 0.0
            languages.append(language)
            scores.append(float(score))
        return pd.DataFrame({"language": languages, "language_score": scores}, index=batch.index)

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        p = self.params
        wrong = (~batch["language"].isin(p.languages) if p.languages is not None
                 else pd.Series(False, index=batch.index))
        return reasons((wrong, "wrong_language"),
                       (batch["language_score"] < p.min_score, "low_language_score"))
