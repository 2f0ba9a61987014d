"""Gopher's quality and repetition heuristics (Rae et al. 2021, https://arxiv.org/abs/2112.11446).

The rules and default thresholds are datatrove's GopherQualityFilter and GopherRepetitionFilter
(src/datatrove/pipeline/filters/gopher_{quality,repetition}_filter.py). datatrove tokenizes with
an NLTK/spaCy word tokenizer; we split with one regex instead (runs of word characters, joined
through inner ' ’ . -, and runs of punctuation): much faster, and close enough for these ratios.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import accumulate, count

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from pipelines.curate.step import Step, StepParams, reasons, threshold

_TOKEN = re.compile(r"\w+(?:['’.\-]\w+)*|[^\w\s]+")
# The same, with words in group 1 and '' for punctuation tokens.
_TOKEN_WORD = re.compile(r"(\w+(?:['’.\-]\w+)*)|[^\w\s]+")
_ALPHA = re.compile(r"[^\W\d_]").search
STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]  # datatrove's list


def _bound(value: float | None, unbounded: float) -> float:
    return unbounded if value is None else value


class GopherQuality(Step):
    """Gopher's quality rules: document length in words, mean word length, '#' and ellipsis per
    word, share of bullet and ellipsis-ended lines, share of words with a letter, stop words.
    A threshold of None turns its rule off."""

    name = "gopher_quality"
    adds = ("gopher_words", "gopher_avg_word_length", "gopher_hash_ratio", "gopher_ellipsis_ratio",
            "gopher_bullet_lines_ratio", "gopher_ellipsis_lines_ratio", "gopher_alpha_words_ratio",
            "gopher_stop_words")

    class Params(StepParams):
        min_doc_words: int | None = threshold(50, ge=0)
        max_doc_words: int | None = threshold(100_000, ge=0)
        min_avg_word_length: float | None = threshold(3, ge=0)
        max_avg_word_length: float | None = threshold(10, ge=0)
        max_symbol_word_ratio: float | None = threshold(0.1, ge=0)  # for '#' and for ellipses
        max_bullet_lines_ratio: float | None = threshold(0.9, ge=0, le=1)
        max_ellipsis_lines_ratio: float | None = threshold(0.3, ge=0, le=1)
        # datatrove's max_non_alpha_words_ratio: the least share of words that have a letter.
        min_alpha_words_ratio: float | None = threshold(0.8, ge=0, le=1)
        min_stop_words: int | None = threshold(2, ge=0)
        # Matched case-sensitively, as in datatrove.
        stop_words: list[str] = Field(default_factory=lambda: list(STOP_WORDS))

    def score(self, batch: pd.DataFrame) -> pd.DataFrame:
        stop = frozenset(self.params.stop_words)
        rows = [self._score_one(text, stop) for text in batch["text"].fillna("").tolist()]
        return pd.DataFrame(rows, index=batch.index, columns=list(self.adds))

    @staticmethod
    def _score_one(text: str, stop: frozenset[str]) -> tuple:
        tokens = _TOKEN_WORD.findall(text)
        words = list(filter(None, tokens))
        n_tokens = len(tokens) or 1
        lines = text.splitlines()
        n_lines = len(lines) or 1
        # Pure-letter words are most of them; only the rest need the regex.
        n_alpha = sum(map(str.isalpha, words)) + sum(
            1 for w in words if not w.isalpha() and _ALPHA(w))
        return (
            len(words),
            sum(map(len, words)) / len(words) if words else 0.0,
            text.count("#") / n_tokens,
            (text.count("...") + text.count("…")) / n_tokens,
            sum(1 for s in lines if s.lstrip().startswith(("•", "-"))) / n_lines,
            sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / n_lines,
            n_alpha / n_tokens,
            sum(map(stop.__contains__, words)),
        )

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        p, inf = self.params, math.inf
        symbols = _bound(p.max_symbol_word_ratio, inf)
        return reasons(
            (batch["gopher_words"] < _bound(p.min_doc_words, -inf), "too_few_words"),
            (batch["gopher_words"] > _bound(p.max_doc_words, inf), "too_many_words"),
            (batch["gopher_avg_word_length"] < _bound(p.min_avg_word_length, -inf), "short_words"),
            (batch["gopher_avg_word_length"] > _bound(p.max_avg_word_length, inf), "long_words"),
            (batch["gopher_hash_ratio"] > symbols, "too_many_hashes"),
            (batch["gopher_ellipsis_ratio"] > symbols, "too_many_ellipses"),
            (batch["gopher_bullet_lines_ratio"] > _bound(p.max_bullet_lines_ratio, inf),
             "bullet_lines"),
            (batch["gopher_ellipsis_lines_ratio"] > _bound(p.max_ellipsis_lines_ratio, inf),
             "ellipsis_lines"),
            (batch["gopher_alpha_words_ratio"] < _bound(p.min_alpha_words_ratio, -inf),
             "low_alpha_words"),
            (batch["gopher_stop_words"] < _bound(p.min_stop_words, -inf), "low_stop_words"),
        )


# Gopher's Table A1 n-gram sizes: the top n-gram for 2-4, all duplicated n-grams for 5-10
# (consecutive: each size's hashes are built from the previous one's).
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """How many items repeat an earlier one, and their characters."""
    if len(set(items)) == len(items):
        return 0, 0
    seen: set[str] = set()
    repeats = chars = 0
    for item in items:
        if item in seen:
            repeats += 1
            chars += len(item)
        else:
            seen.add(item)
    return repeats, chars


# n-grams are hashed, all of one size at once, as a polynomial in token ids modulo 2**64: numpy
# does the arithmetic and the counting runs on Python ints, about 2x faster than tuples of
# strings. They are compared as token sequences; datatrove joins the 5-10-grams without spaces
# before comparing, so there ('ab', 'c') and ('a', 'bc') also count as a repeat.
_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def _ngram_fracs(tokens: list[str], n_chars: int) -> list[float]:
    """The top 2-4-gram and the duplicated 5-10-gram character fractions of one document."""
    m = len(tokens)
    ids = np.fromiter(map({}.setdefault, tokens, count()), dtype=np.uint64, count=m)
    ends = [0, *accumulate(map(len, tokens))]  # characters of tokens i..j-1: ends[j] - ends[i]
    hashes, fracs, positions = ids, [], None
    for n in range(2, DUP_NGRAMS[-1] + 1):
        hashes = hashes[:-1] * _HASH_MULT + ids[n - 1:]
        if n in TOP_NGRAMS:
            fracs.append(_top_ngram_chars(hashes.tolist(), ends, n) / n_chars)
        elif positions is None or len(positions):
            chars, positions = _repeated_ngram_chars(hashes, positions, ends, n)
            fracs.append(chars / n_chars)
        else:  # no (n-1)-gram repeats, so no n-gram does
            fracs.append(0.0)
    return fracs


def _top_ngram_chars(grams: list[int], ends: list[int], n: int) -> int:
    """Characters covered by the most frequent n-gram: its space-joined length times its count
    (the first n-gram seen wins a tie, as with datatrove's Counter.most_common)."""
    counts = Counter(grams)
    if not counts:
        return 0
    top = max(counts.values())
    i = grams.index(list(counts)[list(counts.values()).index(top)])
    return (ends[i + n] - ends[i] + n - 1) * top


def _repeated_ngram_chars(hashes: np.ndarray, positions: np.ndarray | None, ends: list[int],
                          n: int) -> tuple[int, np.ndarray]:
    """Characters of the n-grams that repeat an earlier one, walking left to right and jumping
    past each repeat (datatrove's find_all_duplicate), and the positions that can start a
    repeated (n+1)-gram. An n-gram repeats only where its (n-1)-gram did, so only `positions`
    (those repeats and their first occurrences; None: all) are looked at."""
    m = len(hashes)
    positions = np.arange(m) if positions is None else positions[positions < m]
    grams = hashes[positions].tolist()
    seen: dict[int, int] = {}
    firsts = np.array(list(map(seen.setdefault, grams, positions.tolist())), dtype=np.int64)
    if len(seen) == len(grams):
        return 0, positions[:0]
    repeat = firsts != positions
    repeats, their_firsts = positions[repeat], firsts[repeat]
    first_of = dict(zip(repeats.tolist(), their_firsts.tolist()))
    # Walk runs of consecutive repeats; inside one, every n-th position is counted.
    cuts = np.flatnonzero(np.diff(repeats) != 1) + 1
    starts = repeats[np.concatenate(([0], cuts))].tolist()
    stops = (repeats[np.concatenate((cuts - 1, [-1]))] + 1).tolist()
    skipped = bytearray(m + n)
    jump = b"\x01" * (n - 1)
    chars = end = 0
    for start, stop in zip(starts, stops):
        i = start if start > end else end
        while i < stop:
            if skipped[first_of[i]] and not _visited_earlier(hashes, positions, skipped, i):
                i += 1  # every earlier copy was jumped over: the walk sees it as new
                continue
            chars += ends[i + n] - ends[i]
            skipped[i + 1:i + n] = jump
            end = i = i + n
    following = np.zeros(m, dtype=bool)
    following[repeats] = following[their_firsts] = True
    return chars, np.flatnonzero(following)


def _visited_earlier(hashes: np.ndarray, positions: np.ndarray, skipped: bytearray, i: int) -> bool:
    """Whether the walk visited (did not jump over) an earlier copy of the n-gram at i (rare)."""
    copies = positions[(positions < i) & (hashes[positions] == hashes[i])]
    return any(not skipped[k] for k in copies.tolist())


class GopherRepetition(Step):
    """Gopher's repetition rules: the share of duplicated paragraphs and lines (by count and by
    characters), the characters covered by the top 2-4-gram, and by duplicated 5-10-grams.
    Fractions of characters are of the whole text; a threshold of None turns its rule off."""

    name = "gopher_repetition"
    adds = (("gopher_dup_para_frac", "gopher_dup_para_char_frac", "gopher_dup_line_frac", "gopher_dup_line_char_frac")
            + tuple(f"gopher_top_{n}gram_char_frac" for n in TOP_NGRAMS)
            + tuple(f"gopher_dup_{n}gram_char_frac" for n in DUP_NGRAMS))

    class Params(StepParams):
        dup_line_frac: float | None = threshold(0.3, ge=0)
        dup_para_frac: float | None = threshold(0.3, ge=0)
        dup_line_char_frac: float | None = threshold(0.2, ge=0)
        dup_para_char_frac: float | None = threshold(0.2, ge=0)
        top_n_grams: dict[int, float | None] = threshold({2: 0.2, 3: 0.18, 4: 0.16})
        dup_n_grams: dict[int, float | None] = threshold(
            {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

        @field_validator("top_n_grams", "dup_n_grams")
        @classmethod
        def _scored_sizes(cls, value: dict[int, float | None], info) -> dict[int, float | None]:
            sizes = TOP_NGRAMS if info.field_name == "top_n_grams" else DUP_NGRAMS
            unknown = sorted(set(value) - set(sizes))
            if unknown:
                raise ValueError(f"n-gram sizes {unknown} are not scored; use {list(sizes)}")
            return value

    def score(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [self._score_one(text) for text in batch["text"].fillna("").tolist()]
        return pd.DataFrame(rows, index=batch.index, columns=list(self.adds))

    @staticmethod
    def _score_one(text: str) -> list[float]:
        n_chars = len(text)
        if not n_chars:
            return [0.0] * (4 + len(TOP_NGRAMS) + len(DUP_NGRAMS))
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup_paras, dup_para_chars = _duplicates(paragraphs)
        lines = _LINES.split(text)
        dup_lines, dup_line_chars = _duplicates(lines)
        row = [dup_paras / len(paragraphs), dup_para_chars / n_chars,
               dup_lines / len(lines), dup_line_chars / n_chars]
        return row + _ngram_fracs(_TOKEN.findall(text), n_chars)

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        p, inf = self.params, math.inf
        rules = [
            (batch["gopher_dup_para_frac"] > _bound(p.dup_para_frac, inf), "dup_para_frac"),
            (batch["gopher_dup_para_char_frac"] > _bound(p.dup_para_char_frac, inf),
             "dup_para_char_frac"),
            (batch["gopher_dup_line_frac"] > _bound(p.dup_line_frac, inf), "dup_line_frac"),
            (batch["gopher_dup_line_char_frac"] > _bound(p.dup_line_char_frac, inf),
             "dup_line_char_frac"),
        ]
        rules += [(batch[f"gopher_top_{n}gram_char_frac"] > _bound(frac, inf), f"top_{n}gram")
                  for n, frac in sorted(p.top_n_grams.items())]
        rules += [(batch[f"gopher_dup_{n}gram_char_frac"] > _bound(frac, inf), f"dup_{n}gram")
                  for n, frac in sorted(p.dup_n_grams.items())]
        return reasons(*rules)
