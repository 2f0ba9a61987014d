"""Replace personal data in the text: email addresses, public IP addresses, phone numbers.

After datatrove's PIIFormatter (src/datatrove/pipeline/formatters/pii.py): the same email regex
(matched case-insensitively here) and only globally routable IPs replaced (private, loopback,
link-local and documentation addresses are not personal). Its replacements are realistic values
rather than tokens such as <EMAIL>, so a model trained on the text never sees a placeholder: we
keep its first email and IPv4 replacements, use an IPv6 documentation address (RFC 3849) and a
fictional phone number (NANP 555-01xx). datatrove cycles through several replacements, which would
make a row's output depend on the rows before it; we use one of each. datatrove has no IPv6 or
phone numbers; we add both.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

import pandas as pd

from pipelines.curate.step import Step, StepParams

EMAIL = re.compile(
    r"\b[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"(?:(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
    r"|\[(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[a-z0-9-]*[a-z0-9]:)])", re.IGNORECASE)
# Not inside a longer dotted number or word: '1.2.3.4.5' and 'v1.2.3.4' are not addresses.
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}"
                  r"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)(?!\.?\w)")
# Candidates (2 to 7 colons between hex groups); ipaddress decides what is an address.
IPV6 = re.compile(r"(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])", re.IGNORECASE)
# Phone numbers written with an international '+' prefix (8-15 digits in all, E.164) or in the
# North American 3-3-4 grouping (area code 2-9xx), '(555) 123-4567', '555-123-4567',
# '555.123.4567'. Numbers without either shape (bare digit runs, dates, versions) are too
# ambiguous to touch.
PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}(?!\w|[.-]\d)"
    r"|(?:(?<![\w(])\([2-9]\d{2}\) ?|(?<![\w.+-])[2-9]\d{2}[ .-])\d{3}[.-]\d{4}(?!\w|[.-]\d)")


# Cheap signs that a line may hold a match (a literal first character lets `re` skip ahead fast);
# the full patterns, ~10x slower per character, run only on those lines.
EMAIL_HINT = re.compile("@")
IPV4_HINT = re.compile(r"\.\d")
IPV6_HINT = re.compile(r":[0-9a-f]{0,4}:", re.IGNORECASE)
PHONE_HINT = re.compile(r"\+\d|[.-]\d{4}")


def _sub_lines(text: str, hint: re.Pattern, pattern: re.Pattern,
               replace: Callable[[re.Match], str]) -> str:
    """`pattern.sub(replace, text)` over only the lines where `hint` matches (no pattern spans a
    line break, and one that starts or ends at a line's edge sees the same as in the text)."""
    pieces, done = [], 0
    for hit in hint.finditer(text):
        if hit.start() < done:
            continue
        start = text.rfind("\n", 0, hit.start()) + 1
        end = text.find("\n", hit.end())
        end = len(text) if end < 0 else end
        pieces += [text[done:start], pattern.sub(replace, text[start:end])]
        done = end
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _replace(text: str, hint: re.Pattern, pattern: re.Pattern, valid: Callable[[str], bool],
             replacement: str) -> tuple[str, int]:
    """The text with the valid matches of `pattern` replaced, and how many there were."""
    n = 0

    def replace(match: re.Match) -> str:
        nonlocal n
        if not valid(match.group()):
            return match.group()
        n += 1
        return replacement

    return _sub_lines(text, hint, pattern, replace), n


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Hex-only words around '::' parse as IPv6 ('a::b', C++ 'cc::db'); real addresses have digits.
    if not any(c.isdigit() for c in text):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _public_ip(text: str) -> bool:
    ip = _ip(text)
    return ip is not None and ip.is_global


def _valid_ip(text: str) -> bool:
    return _ip(text) is not None


def _phone(text: str) -> bool:
    return text[0] != "+" or 8 <= sum(c.isdigit() for c in text) <= 15


class PiiRedact(Step):
    """Replace email addresses, public IPv4/IPv6 addresses and phone numbers in `text` with fixed
    replacements, each kind switchable; score how many of each were replaced (`pii_emails`,
    `pii_ips`, `pii_phones`). Never drops a row."""

    name = "pii_redact"
    adds = ("pii_emails", "pii_ips", "pii_phones")

    class Params(StepParams):
        emails: bool = True
        ips: bool = True
        only_public_ips: bool = True  # datatrove's default: private addresses are not personal
        phones: bool = True
        email_replacement: str = "email@example.com"
        ipv4_replacement: str = "22.214.171.124"
        ipv6_replacement: str = "2001:db8::1"
        phone_replacement: str = "+1-202-555-0100"

    def __init__(self, params: StepParams | None = None):
        super().__init__(params)
        p = self.params
        ip_ok = _public_ip if p.only_public_ips else _valid_ip
        # (score column, hint, pattern, check of a match, replacement), applied in this order.
        self.rules: list[tuple[str, re.Pattern, re.Pattern, Callable[[str], bool], str]] = []
        if p.emails:
            self.rules.append(("pii_emails", EMAIL_HINT, EMAIL, bool, p.email_replacement))
        if p.ips:
            self.rules += [("pii_ips", IPV4_HINT, IPV4, ip_ok, p.ipv4_replacement),
                           ("pii_ips", IPV6_HINT, IPV6, ip_ok, p.ipv6_replacement)]
        if p.phones:
            self.rules.append(("pii_phones", PHONE_HINT, PHONE, _phone, p.phone_replacement))

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with PII replaced, and how many of each kind were replaced."""
        counts = {"pii_emails": 0, "pii_ips": 0, "pii_phones": 0}
        for column, hint, pattern, valid, replacement in self.rules:
            text, n = _replace(text, hint, pattern, valid, replacement)
            counts[column] += n
        return text, counts

    def score(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [self.redact(text)[1] for text in batch["text"].fillna("").tolist()]
        return pd.DataFrame(rows, index=batch.index,
                            columns=["pii_emails", "pii_ips", "pii_phones"])

    def transform(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = [self.redact(text)[0] for text in batch["text"].fillna("").tolist()]
        return batch.assign(text=pd.Series(texts, index=batch.index, dtype=batch["text"].dtype))

