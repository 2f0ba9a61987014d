"""C4's line and page rules (Raffel et al. 2020, https://jmlr.org/papers/v21/20-074.html).

Rules and defaults are datatrove's C4QualityFilter (src/datatrove/pipeline/filters/c4_filters.py),
splitting on lines as C4 does. datatrove counts sentences with an NLTK/spaCy sentence tokenizer; we
count runs of . ! ? followed by a space or the end of the line (at least one per kept line).
"""

from __future__ import annotations

import re

import pandas as pd

from pipelines.curate.step import Step, StepParams, reasons, threshold

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+['\"”’)\]]*(?=\s|$)")


class C4Lines(Step):
    """Keep only the lines that look like prose (end in terminal punctuation, have at least
    `min_words_per_line` words, no word over `max_word_length` characters, no 'javascript', no
    cookie/terms-of-use boilerplate; Wikipedia citation marks removed), then drop pages that have
    'lorem ipsum' or a curly bracket in a kept line, or fewer than `min_num_sentences` sentences
    left.

    The line decisions change the text, so they are parameters, not thresholds: `score` records
    what they found (`c4_lines`, `c4_lines_kept`, `c4_sentences`, `c4_lorem_ipsum`,
    `c4_curly_bracket`) and `transform` rewrites the text to the kept lines (it makes the same
    decisions again: score columns are cached, the text is not)."""

    name = "c4_lines"
    adds = ("c4_lines", "c4_lines_kept", "c4_sentences", "c4_lorem_ipsum", "c4_curly_bracket")

    class Params(StepParams):
        remove_citations: bool = True
        filter_no_terminal_punct: bool = True
        min_words_per_line: int | None = 3
        max_word_length: int | None = 1000
        filter_javascript: bool = True
        filter_policy: bool = True
        # Page rules, from the scores.
        min_num_sentences: int | None = threshold(5, ge=0)
        filter_lorem_ipsum: bool = threshold(True)
        filter_curly_bracket: bool = threshold(True)

    def _kept_lines(self, text: str) -> tuple[list[str], int, bool, bool]:
        """The kept lines, the number of lines, and whether a kept-so-far line had 'lorem ipsum'
        or '{' (datatrove stops at that line and drops the page; we go on, and drop decides)."""
        p = self.params
        lines = text.splitlines()
        kept, lorem, curly = [], False, False
        longest = p.max_word_length if p.max_word_length is not None else float("inf")
        for line in lines:
            line = line.strip()
            words = line.split()
            if max(map(len, words), default=0) > longest:
                continue
            if p.remove_citations:
                line = CITATION.sub("", line)
            if p.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION)
                                               or line.endswith(ELLIPSIS)):
                continue
            if p.min_words_per_line is not None and len(words) < p.min_words_per_line:
                continue
            lower = line.lower()
            lorem = lorem or "lorem ipsum" in lower
            if p.filter_javascript and "javascript" in lower:
                continue
            curly = curly or "{" in line
            if p.filter_policy and any(s in lower for s in POLICY_SUBSTRINGS):
                continue
            kept.append(line)
        return kept, len(lines), lorem, curly

    def score(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for text in batch["text"].fillna("").tolist():
            kept, n_lines, lorem, curly = self._kept_lines(text)
            sentences = sum(max(1, len(_SENTENCE_END.findall(line))) for line in kept)
            rows.append((n_lines, len(kept), sentences, lorem, curly))
        return pd.DataFrame(rows, index=batch.index, columns=[
            "c4_lines", "c4_lines_kept", "c4_sentences", "c4_lorem_ipsum", "c4_curly_bracket"])

    def transform(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = ["\n".join(self._kept_lines(text)[0]).strip()
                 for text in batch["text"].fillna("").tolist()]
        return batch.assign(text=pd.Series(texts, index=batch.index, dtype=batch["text"].dtype))

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        p = self.params
        min_sentences = p.min_num_sentences if p.min_num_sentences is not None else 0
        return reasons(
            (batch["c4_lorem_ipsum"] & p.filter_lorem_ipsum, "lorem_ipsum"),
            (batch["c4_curly_bracket"] & p.filter_curly_bracket, "curly_bracket"),
            (batch["c4_sentences"] < min_sentences, "too_few_sentences"),
        )
