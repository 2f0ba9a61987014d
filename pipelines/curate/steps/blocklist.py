"""Drop documents by URL: a domain blocklist and banned words or substrings."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
from pipelines.curate.step import Step, StepParams, reasons, threshold
from pipelines.errors import PipelineError

_URL_WORDS = re.compile(r"[^a-z0-9]+")


def read_list(path: str) -> list[str]:
    """Entries of a list file: one per line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PipelineError(f"cannot read blocklist {path}: {exc.strerror or exc}") from exc
    return [entry for line in lines if (entry := line.split("#", 1)[0].strip())]


def _domain(entry: str) -> str:
    """'*.Example.COM.', '.example.com' or 'https://example.com/x' -> 'example.com'."""
    entry = entry.strip().lower()
    if "/" in entry:
        entry = urlsplit(entry if "//" in entry else "//" + entry).hostname or ""
    return entry.lstrip("*.").rstrip(".")


def url_host(url: str) -> str | None:
    """The lower-case host of a URL (with or without a scheme), or None."""
    try:
        host = urlsplit(url if "//" in url else "//" + url).hostname
    except ValueError:  # e.g. an invalid IPv6 literal
        return None
    return host.rstrip(".") if host else None


class UrlBlocklist(Step):
    """Drop rows whose URL's host is a blocked domain or a subdomain of one (`blocked_domain`), or
    whose URL has a banned word (a whole run of letters and digits, like datatrove's URLFilter
    banned_words) or contains a banned substring, case-insensitively (`blocked_url`). Lists are
    given inline and/or as files (one entry per line, `#` comments). Rows without a URL are kept.
    datatrove's integrated adult-domain lists are not bundled: point `domains_file` at one."""

    name = "url_blocklist"
    columns = ("url",)

    # No scores: `drop` reads the URL and the lists (all thresholds) directly.
    class Params(StepParams):
        domains: list[str] = threshold([])
        domains_file: str | None = threshold(None)
        url_words: list[str] = threshold([])
        url_substrings: list[str] = threshold([])
        url_substrings_file: str | None = threshold(None)

    def __init__(self, params: StepParams | None = None):
        super().__init__(params)
        p = self.params
        domains = p.domains + (read_list(p.domains_file) if p.domains_file else [])
        self.domains = frozenset(filter(None, map(_domain, domains)))
        self.words = frozenset(w.lower() for w in p.url_words)
        substrings = p.url_substrings + (read_list(p.url_substrings_file)
                                         if p.url_substrings_file else [])
        substrings = sorted({s.lower() for s in substrings})
        self.substrings = re.compile("|".join(map(re.escape, substrings))) if substrings else None

    def _blocked_domain(self, url: str) -> bool:
        host = url_host(url)
        if not host:
            return False
        labels = host.split(".")
        # The host and each parent domain: a.b.example.com, b.example.com, example.com, com.
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))

    def _blocked_url(self, url: str) -> bool:
        lower = url.lower()
        if self.words and not self.words.isdisjoint(_URL_WORDS.split(lower)):
            return True
        return bool(self.substrings and self.substrings.search(lower))

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        urls = [u if isinstance(u, str) and u else None for u in batch["url"].tolist()]
        domain = [bool(self.domains) and u is not None and self._blocked_domain(u) for u in urls]
        url = [u is not None and self._blocked_url(u) for u in urls]
        return reasons((pd.Series(domain, index=batch.index, dtype=bool), "blocked_domain"),
                       (pd.Series(url, index=batch.index, dtype=bool), "blocked_url"))
