"""The text curation steps: hand-made documents kept or dropped with the expected reason, at and
around each threshold; thresholds that change decisions but not scores; the rewritten text."""

from __future__ import annotations

import random
from collections import Counter

import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.curate.step import Step
from pipelines.curate.steps.blocklist import UrlBlocklist
from pipelines.curate.steps.c4 import C4Lines
from pipelines.curate.steps.gopher import _TOKEN, GopherQuality, GopherRepetition, _ngram_fracs
from pipelines.curate.steps.language import Language
from pipelines.curate.steps.length import Length
from pipelines.curate.steps.pii import PiiRedact


def run(step: Step, texts: list[str | None], **columns) -> tuple[pd.DataFrame, list[str | None]]:
    """What the engine does with one batch: score, then transform, then drop. An index that is
    not 0..n-1 catches results that are not aligned to the batch."""
    batch = pd.DataFrame({"text": texts, **columns}, index=range(100, 100 + len(texts)))
    scores = step.score(batch)
    if scores is not None:
        batch = batch.assign(**dict(pd.DataFrame(scores).items()))
    batch = step.transform(batch)
    dropped = step.drop(batch)
    reasons = [None] * len(batch) if dropped is None else dropped.reindex(batch.index).tolist()
    return batch, reasons


def words(n: int, word: str = "house") -> str:
    return " ".join([word] * n)


def assert_threshold_only(step_cls: type[Step], **changes) -> None:
    assert step_cls.Params(**changes).score_digest() == step_cls.Params().score_digest()


# -- length --------------------------------------------------------------------------------------
def test_length_scores_and_default_bound():
    batch, reasons = run(Length(), ["", "   \n", "one", "two words\nand more"])
    assert batch["length_words"].tolist() == [0, 0, 1, 4]
    assert batch["length_chars"].tolist() == [0, 4, 3, 18]
    assert reasons == ["too_few_words", "too_few_words", None, None]


def test_length_bounds_are_inclusive():
    step = Length(Length.Params(min_words=3, max_words=4, min_chars=6, max_chars=9))
    _, reasons = run(step, ["a b", "a b c", "a b cd", "a b c d e", "aa bb cc dd", "a bb c"])
    assert reasons == ["too_few_words", "too_few_chars", None, "too_many_words", "too_many_chars",
                       None]


def test_length_threshold_changes_decision_not_scores():
    texts = ["a b", "a b c d e f"]
    first, before = run(Length(), texts)
    second, after = run(Length(Length.Params(min_words=3, max_words=5)), texts)
    assert before == [None, None] and after == ["too_few_words", "too_many_words"]
    assert first["length_words"].tolist() == second["length_words"].tolist()
    assert_threshold_only(Length, min_words=3, max_words=5, min_chars=1, max_chars=10)


def test_length_missing_text_counts_as_empty():
    _, reasons = run(Length(), [None, "word"])
    assert reasons == ["too_few_words", None]


# -- language ------------------------------------------------------------------------------------
ENGLISH = "The committee will publish its final report on the new railway line next spring."
GERMAN = ("Der Ausschuss wird seinen Abschlussbericht über die neue Bahnstrecke im Frühjahr "
          "vorlegen.")
FRENCH = ("Le comité publiera son rapport final sur la nouvelle ligne de chemin de fer au "
          "printemps.")


def test_language_detects_real_sentences():
    batch, reasons = run(Language(), [ENGLISH, GERMAN, FRENCH, ""])
    assert batch["language"].tolist()[:3] == ["en", "de", "fr"]
    assert pd.isna(batch["language"].iloc[3])  # missing (NaN in pandas' str dtype)
    scores = batch["language_score"].tolist()
    assert all(s > 0.9 for s in scores[:3]) and scores[3] == 0.0
    assert reasons == [None, None, None, "low_language_score"]


def test_language_list_and_min_score_are_thresholds():
    texts = [ENGLISH, GERMAN, "ok"]
    first, _ = run(Language(), texts)
    assert first["language_score"].iloc[2] < 0.65  # two letters say little
    second, reasons = run(Language(Language.Params(languages=["en", "fr"], min_score=0.999)), texts)
    assert reasons == ["low_language_score", "wrong_language", "wrong_language"]
    assert first["language_score"].tolist() == second["language_score"].tolist()
    assert_threshold_only(Language, languages=["en"], min_score=0.9)
    assert Language.Params(max_chars=500).score_digest() != Language.Params().score_digest()


def test_language_reads_only_the_first_max_chars():
    text = ENGLISH + " " + " ".join([GERMAN] * 20)
    batch, _ = run(Language(Language.Params(max_chars=len(ENGLISH))), [text])
    assert batch["language"].tolist() == ["en"]
    batch, _ = run(Language(), [text])
    assert batch["language"].tolist() == ["de"]


# -- gopher quality ------------------------------------------------------------------------------
def prose(n_words: int) -> str:
    """`n_words` words alternating 'the' and 'house' (mean length 4 when even)."""
    return " ".join((["the", "house"] * n_words)[:n_words])


def test_gopher_quality_keeps_prose_and_scores_it():
    batch, reasons = run(GopherQuality(), [prose(50)])
    row = batch.iloc[0]
    assert (row.gopher_words, row.gopher_avg_word_length, row.gopher_stop_words) == (50, 4.0, 25)
    assert row.gopher_alpha_words_ratio == 1.0 and row.gopher_hash_ratio == 0.0
    assert reasons == [None]


def test_gopher_quality_word_count_bounds():
    _, reasons = run(GopherQuality(GopherQuality.Params(max_doc_words=60)),
                     [prose(49), prose(50), prose(60), prose(61)])
    assert reasons == ["too_few_words", None, None, "too_many_words"]


def test_gopher_quality_mean_word_length():
    docs = [words(25, "ab the"), words(50, "the"), words(25, "the interrelationships"),
            words(25, "the interrelationship")]
    batch, reasons = run(GopherQuality(), docs)
    assert batch["gopher_avg_word_length"].tolist() == [2.5, 3.0, 10.5, 10.0]
    assert reasons == ["short_words", None, "long_words", None]


def test_gopher_quality_hashes_and_ellipses_per_word():
    # 50 words and k symbol tokens: k / (50 + k) > 0.1 from k = 6
    docs = [prose(50) + " #" * 5, prose(50) + " #" * 6, "... " * 5 + prose(50),
            "… " * 6 + prose(50)]
    _, reasons = run(GopherQuality(), docs)
    assert reasons == [None, "too_many_hashes", None, "too_many_ellipses"]


def test_gopher_quality_bullet_and_ellipsis_lines():
    line = "the quick brown fox jumped over the lazy dog near the old barn"  # 13 words

    def lines(first_k: str, rest: str, k: int) -> str:
        """10 lines, the first k of them with `first_k` around the line, the others `rest`."""
        return "\n".join((first_k if i < k else rest).replace("LINE", line) for i in range(10))

    docs = [lines("- LINE", "LINE", 9), lines("- LINE", "LINE", 10), lines("  • LINE", "", 10),
            lines("LINE ...", "LINE.", 3), lines("LINE…", "LINE.", 4)]
    batch, reasons = run(GopherQuality(), docs)
    assert batch["gopher_bullet_lines_ratio"].tolist()[:3] == [0.9, 1.0, 1.0]
    assert batch["gopher_ellipsis_lines_ratio"].tolist()[3:] == [0.3, 0.4]
    assert reasons == [None, "bullet_lines", "bullet_lines", None, "ellipsis_lines"]


def test_gopher_quality_words_with_letters_and_stop_words():
    # 50 words with letters and k numbers: 50 / (50 + k) < 0.8 from k = 13
    docs = [prose(50) + " 123" * 12, prose(50) + " 123" * 13,
            words(49, "house") + " the", words(48, "house") + " the of",
            words(48, "house") + " The Of"]  # stop words match case-sensitively, as in datatrove
    _, reasons = run(GopherQuality(), docs)
    assert reasons == [None, "low_alpha_words", "low_stop_words", None, "low_stop_words"]


def test_gopher_quality_thresholds_do_not_change_scores():
    docs = [words(49, "house") + " the", prose(30)]
    first, before = run(GopherQuality(), docs)
    second, after = run(GopherQuality(GopherQuality.Params(min_stop_words=None, min_doc_words=20)),
                        docs)
    assert before == ["low_stop_words", "too_few_words"] and after == [None, None]
    pd.testing.assert_frame_equal(first, second)
    assert_threshold_only(GopherQuality, min_doc_words=None, max_avg_word_length=12,
                          min_alpha_words_ratio=0.5, min_stop_words=1)
    assert (GopherQuality.Params(stop_words=["a"]).score_digest()
            != GopherQuality.Params().score_digest())


def test_gopher_quality_empty_text():
    batch, reasons = run(GopherQuality(), [""])
    assert batch["gopher_words"].tolist() == [0] and reasons == ["too_few_words"]


# -- gopher repetition ---------------------------------------------------------------------------
def unique_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7)) for _ in range(n)]


def unique_line(seed: int) -> str:
    return " ".join(unique_words(10, seed)) + "."


def test_gopher_repetition_keeps_text_without_repeats():
    batch, reasons = run(GopherRepetition(), ["\n".join(unique_line(i) for i in range(10))])
    assert reasons == [None]
    assert batch.filter(like="gopher_dup_").iloc[0].sum() == 0


def test_gopher_repetition_duplicate_lines_and_paragraphs():
    lines = [unique_line(i) for i in range(7)]
    at_limit = "\n".join(lines[:6] + ["ok."] * 4)  # 3 of 10 lines repeat: 0.3 is not above 0.3
    over = "\n".join(lines + ["ok."] * 5)  # 4 of 12 lines repeat
    long_repeat = "\n".join(lines[:5] + [lines[0]] * 2)  # few repeats, but 2/7 of the characters
    paragraphs = "\n\n".join([lines[0], lines[1], lines[0], lines[1]])
    batch, reasons = run(GopherRepetition(), [at_limit, over, long_repeat, paragraphs])
    assert batch["gopher_dup_line_frac"].round(4).tolist() == [0.3, 0.3333, 0.2857, 0.5]
    assert reasons == [None, "dup_line_frac", "dup_line_char_frac", "dup_para_frac"]


def test_gopher_repetition_top_and_repeated_ngrams():
    filler = " ".join(unique_words(60, 1))  # 479 characters
    top = filler + " " + "to be " * 30  # 'to be' (5 characters) 30 times: 150 of 660
    repeated = filler + " " + " ".join(unique_words(20, 2) * 2)  # 20 words of 7 letters, twice
    batch, reasons = run(GopherRepetition(), [top, repeated])
    assert batch["gopher_top_2gram_char_frac"].iloc[0] == pytest.approx(150 / len(top))
    assert reasons == ["top_2gram", "dup_5gram"]
    # The second copy's 5-grams at its words 0, 5, 10 and 15 repeat (the walk jumps 5 past each):
    # 4 * 5 words * 7 letters.
    assert batch["gopher_dup_5gram_char_frac"].iloc[1] * len(repeated) == pytest.approx(140)


def test_gopher_repetition_thresholds_do_not_change_scores():
    doc = "\n".join([unique_line(i) for i in range(7)] + ["ok."] * 5)
    first, before = run(GopherRepetition(), [doc])
    second, after = run(GopherRepetition(GopherRepetition.Params(
        dup_line_frac=None, top_n_grams={2: 0.5}, dup_n_grams={5: 0.9})), [doc])
    assert before == ["dup_line_frac"] and after == [None]
    pd.testing.assert_frame_equal(first, second)
    assert_threshold_only(GopherRepetition, dup_para_frac=0.5, top_n_grams={3: None})
    with pytest.raises(ValidationError, match="not scored"):
        GopherRepetition.Params(top_n_grams={5: 0.1})


# datatrove's n-gram functions (gopher_repetition_filter.py), verbatim: the oracle.
def get_n_grams(words: list[str], n: int) -> list[str]:
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def find_top_duplicate(x: list[str]) -> int:
    counter = Counter()
    for element in x:
        counter[element] += 1
    top_n_gram = counter.most_common(1)[0]
    return len(top_n_gram[0]) * top_n_gram[1]


def find_all_duplicate(words: list[str], n: int) -> int:
    n_words = len(words)
    unique = set()
    repeated_chars, idx = 0, 0
    while idx < n_words - n + 1:
        n_gram = "".join(words[idx : idx + n])
        if n_gram in unique:
            repeated_chars += len(n_gram)
            idx += n
        else:
            unique.add(n_gram)
            idx += 1
    return repeated_chars


def test_gopher_repetition_ngrams_match_datatrove():
    rng = random.Random(0)
    for _ in range(400):
        # Words of one length, so joining without spaces cannot make two n-grams equal.
        vocab = unique_words(rng.randint(1, 8), rng.random())
        tokens = [rng.choice(vocab) for _ in range(rng.randint(0, 120))]
        if rng.random() < 0.5:  # long exact repeats, and repeats of repeats
            tokens = tokens[: len(tokens) // 3] * 3 + tokens[5:30] * 2
        text = " ".join(tokens) or "x"
        assert _TOKEN.findall(text) == (tokens or ["x"])
        expected = [find_top_duplicate(get_n_grams(tokens, n)) if len(tokens) >= n else 0
                    for n in (2, 3, 4)]
        expected += [find_all_duplicate(tokens, n) for n in range(5, 11)]
        got = [round(f * len(text)) for f in _ngram_fracs(tokens, len(text))]
        assert got == expected, tokens


# -- c4 ------------------------------------------------------------------------------------------
GOOD = ["The museum opens at nine every morning.", "Tickets can be bought at the front desk.",
        "Guided tours start on the hour! Ask the staff.", "Is photography allowed inside?",
        'The guide said "please do not touch the paintings."']  # 6 sentences


def test_c4_keeps_prose_lines_and_rewrites_the_text():
    doc = "\n".join([
        "  Home | About | Contact  ",  # no terminal punctuation
        GOOD[0],
        "Too short.",  # two words
        GOOD[1] + "  ",
        "Paris is the capital[1] of France[citation needed].",  # citations removed
        "Read more about it here...",  # ends with an ellipsis
        "Please enable JavaScript to use this site.",
        "By using this site you agree to our Terms of Use.",
        "This word is " + "x" * 1001 + " long.",
        "",
        *GOOD[2:],
    ])
    batch, reasons = run(C4Lines(), [doc])
    assert batch["text"].iloc[0] == "\n".join(
        GOOD[:2] + ["Paris is the capital of France."] + GOOD[2:])
    row = batch.iloc[0]
    assert (row.c4_lines, row.c4_lines_kept, row.c4_sentences) == (13, 6, 7)
    assert reasons == [None]


def test_c4_drops_pages_with_too_few_sentences():
    four, five = "\n".join(GOOD[:3]), "\n".join(GOOD[:4])
    batch, reasons = run(C4Lines(), [four, five, ""])
    assert batch["c4_sentences"].tolist() == [4, 5, 0]
    assert reasons == ["too_few_sentences", None, "too_few_sentences"]
    assert batch["text"].tolist() == [four, five, ""]


def test_c4_lorem_ipsum_and_curly_brackets_count_in_kept_lines_only():
    body = "\n".join(GOOD)
    docs = [body + "\nLorem ipsum dolor sit amet, consectetur.",
            body + "\nlorem ipsum in a line without punctuation",
            body + "\nUse a dict like {'a': 1} for this.",
            body + "\nfunction f() { return 1; }"]
    batch, reasons = run(C4Lines(), docs)
    assert batch["c4_lorem_ipsum"].tolist() == [True, False, False, False]
    assert batch["c4_curly_bracket"].tolist() == [False, False, True, False]
    assert reasons == ["lorem_ipsum", None, "curly_bracket", None]


def test_c4_page_rules_are_thresholds_line_rules_are_not():
    docs = ["\n".join(GOOD[:3]), "\n".join(GOOD) + "\nUse a dict like {'a': 1} for this."]
    first, before = run(C4Lines(), docs)
    second, after = run(C4Lines(C4Lines.Params(min_num_sentences=None,
                                               filter_curly_bracket=False)), docs)
    assert before == ["too_few_sentences", "curly_bracket"] and after == [None, None]
    pd.testing.assert_frame_equal(first, second)
    assert second["text"].iloc[1].endswith("{'a': 1} for this.")  # kept once not dropped for it
    assert_threshold_only(C4Lines, min_num_sentences=1, filter_lorem_ipsum=False)
    assert C4Lines.Params(min_words_per_line=1).score_digest() != C4Lines.Params().score_digest()


def test_c4_line_rules_can_be_turned_off():
    doc = "Menu\nHome\n" + "\n".join(GOOD)
    step = C4Lines(C4Lines.Params(filter_no_terminal_punct=False, min_words_per_line=None))
    batch, _ = run(step, [doc])
    assert batch["text"].iloc[0] == doc


# -- url blocklist -------------------------------------------------------------------------------
URLS = ["https://example.com/page", "http://a.b.Example.COM:8080/x", "example.com/no-scheme",
        "https://notexample.com/", "https://example.com.evil.net/", "https://bad.org./x",
        "https://news.site/porn-videos", "https://news.site/pornography",
        "https://ONLINECASINO.net/", None, "", "https://fine.org/article"]


def test_url_blocklist_domains_subdomains_words_and_substrings(tmp_path):
    listing = tmp_path / "domains.txt"
    listing.write_text("# adult domains\n\n*.bad.org   # and its subdomains\n")
    step = UrlBlocklist(UrlBlocklist.Params(domains=["Example.com"], domains_file=str(listing),
                                            url_words=["porn"], url_substrings=["casino"]))
    _, reasons = run(step, [""] * len(URLS), url=URLS)
    assert reasons == ["blocked_domain", "blocked_domain", "blocked_domain", None, None,
                       "blocked_domain", "blocked_url", None, "blocked_url", None, None, None]


def test_url_blocklist_keeps_everything_by_default_and_reads_files(tmp_path):
    _, reasons = run(UrlBlocklist(), [""] * len(URLS), url=URLS)
    assert reasons == [None] * len(URLS)
    listing = tmp_path / "substrings.txt"
    listing.write_text("casino\n")
    step = UrlBlocklist(UrlBlocklist.Params(url_substrings_file=str(listing)))
    assert run(step, ["", ""], url=["https://casino.example/", "https://x.org/"])[1] == [
        "blocked_url", None]


def test_url_blocklist_missing_file_is_a_user_error(tmp_path):
    from pipelines.errors import PipelineError

    with pytest.raises(PipelineError, match="missing.txt"):
        UrlBlocklist(UrlBlocklist.Params(domains_file=str(tmp_path / "missing.txt")))


# -- pii -----------------------------------------------------------------------------------------
def test_pii_replaces_emails_public_ips_and_phones():
    text = ("Write to John.Doe@Example.com or ops+alerts@mail.example.co.uk. "
            "Servers 8.8.8.8 and 2001:4860:4860::8888 answer; 192.168.1.10, 127.0.0.1, ::1, "
            "fe80::1 and 10.0.0.7 are private.\n"
            "Call +1 (415) 555-2671, 415-555-2671, (415) 555-2671, 415.555.2671, "
            "+44 20 7946 0958 or +33 1 23 45 67 89.")
    batch, reasons = run(PiiRedact(), [text])
    assert batch["text"].iloc[0] == (
        "Write to email@example.com or email@example.com. "
        "Servers 22.214.171.124 and 2001:db8::1 answer; 192.168.1.10, 127.0.0.1, ::1, "
        "fe80::1 and 10.0.0.7 are private.\n"
        "Call +1-202-555-0100, +1-202-555-0100, +1-202-555-0100, +1-202-555-0100, "
        "+1-202-555-0100 or +1-202-555-0100.")
    assert batch[["pii_emails", "pii_ips", "pii_phones"]].iloc[0].tolist() == [2, 2, 6]
    assert reasons == [None]


def test_pii_leaves_ordinary_numbers_alone():
    text = ("On 2023-01-15 (15/01/2023, 15.01.2023) at 10:30:45 we shipped version 1.2.3 and "
            "Python 3.11.4, build 10.0.19041.1 and v1.2.3.4; 1,234,567 items cost $3.14159 each "
            "(12345678 in total, range 1990-2000). ISBN 978-3-16-148410-0, MAC 00:1a:2b:3c:4d:5e, "
            "std::vector, cc::db, score +3 points, 100-200-3000, user@ alone, 1.2.3.4.5.")
    batch, _ = run(PiiRedact(), [text])
    assert batch["text"].iloc[0] == text
    assert batch[["pii_emails", "pii_ips", "pii_phones"]].iloc[0].tolist() == [0, 0, 0]


def test_pii_kinds_can_be_turned_off_and_private_ips_included():
    text = "mail a@b.org from 10.1.2.3 or 8.8.4.4, call 415-555-2671"
    step = PiiRedact(PiiRedact.Params(emails=False, phones=False, only_public_ips=False,
                                      ipv4_replacement="<IP>"))
    batch, _ = run(step, [text])
    assert batch["text"].iloc[0] == "mail a@b.org from <IP> or <IP>, call 415-555-2671"
    assert batch[["pii_emails", "pii_ips", "pii_phones"]].iloc[0].tolist() == [0, 2, 0]


def test_pii_is_idempotent_and_row_independent():
    step = PiiRedact()
    texts = ["a@b.org 8.8.8.8 +44 20 7946 0958", "x@y.org", "no pii here"]
    once, _ = run(step, texts)
    twice, _ = run(step, once["text"].tolist())
    assert twice["text"].tolist() == once["text"].tolist()
    alone, _ = run(step, texts[1:2])
    assert alone["text"].iloc[0] == once["text"].iloc[1]
