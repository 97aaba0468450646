"""Personal data redaction: e-mail addresses, phone numbers, public IP addresses, card numbers.

Each kind becomes a placeholder token rather than disappearing, so the model still learns that
such things occur in text without memorising any particular one. Patterns favour precision:
numbers that are rarely personal (years, versions, dates, prices, hashes, bare digit runs) are
left alone, at the cost of missing unusually written phones.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from llmforge.data.records import Document

# Starts only at a token boundary, so a long run of address characters is scanned once.
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")

# Cards as printed: 13-19 digits unbroken, in fours (4-4-4-1..7), or Amex/Diners style
# (4-6-4/5), with one kind of separator throughout; never part of a longer number. Runs of
# short numbers (a table row, "4 5 6 7 ...") are not cards.
_CARD = re.compile(
    r"(?<![\w.+])(?<!\d[ -])"
    r"(?:\d{13,19}|\d{4}([ -])\d{6}\1\d{4,5}|\d{4}([ -])\d{4}\2\d{4}\2\d{1,7})"
    r"(?![ -]?\d)(?!\w|\.\d)"
)
# Issuer prefixes in use (ISO/IEC 7812 ranges, to two digits): 4 Visa; 22-27, 51-55 Mastercard;
# 34, 37 Amex; 30, 36, 38 Diners; 35 JCB; 60, 64, 65 Discover; 62 UnionPay; 50, 56-58, 63, 67
# Maestro. Other numbers (order ids, 2017... timestamps) pass Luhn by chance 1 time in 10.
_CARD_ISSUER = re.compile(r"4|2[2-7]|5[0-8]|3[04-8]|6[0-7]")

# Dotted quads not inside a longer dotted sequence (OIDs, versions like 1.2.3.4.5). A four-part
# version whose parts happen to form a public address (Oracle 11.2.0.4) is redacted too.
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
# Hex groups and colons, optionally ending in a dotted quad; `ipaddress` decides validity, so
# times (12:30:45) and C++ scopes (std::vector) are left alone.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)

# Phones come in three shapes. None takes a bare digit run (an id, a hash, a timestamp), a
# year, a price or a version; each must stand alone, not be the start of a longer number.
_ALONE_BEFORE, _ALONE_AFTER = r"(?<![\w+.-])", r"(?!\w|[.:/-]\d)"
# "+" country code, then groups: +44 20 7946 0958, +1 (202) 555-0143, +49 (0)30 1234567,
# +14155552671. 8-15 digits (E.164 allows at most 15); groups after the first have >= 2 digits,
# so a signed decimal (+3523645.6) is not one.
_PHONE_INTL = re.compile(
    rf"{_ALONE_BEFORE}\+[1-9]\d{{0,2}}[ .-]?(?:\(\d{{1,4}}\)[ .-]?)?\d{{1,12}}"
    rf"(?:[ .-]\d{{2,8}}){{0,6}}{_ALONE_AFTER}"
)
# North American: (202) 555-0143, 202-555-0143, 202.555.0143, 1-800-555-0199; area code and
# exchange start with 2-9, as the numbering plan requires. Separators are mandatory.
_PHONE_NANP = re.compile(
    rf"{_ALONE_BEFORE}(?:1[ .-])?(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{{4}}"
    rf"{_ALONE_AFTER}"
)
# European national: trunk 0, area code, a separator, groups: 020 7946 0958, 01 23 45 67 89,
# 030/1234567, 06-12345678. 9-12 digits, so ISSNs (0378-8733) and dates (05-12-2023) are not
# phones; dots are not separators, so arXiv ids (0906.0612) are not either, and nothing that
# starts like a date (05-12-2023 14 ...) is taken.
_PHONE_EU = re.compile(
    rf"{_ALONE_BEFORE}(?!\d\d?[./-]\d\d?[./-]\d{{2,4}}(?!\d))"
    rf"\(?0[1-9]\d{{0,3}}\)?[ /-]\d{{2,8}}(?:[ -]\d{{2,8}}){{0,3}}{_ALONE_AFTER}"
)


@dataclass(frozen=True)
class _DigitCount:
    """Accepts a match holding between `low` and `high` digits."""

    low: int
    high: int

    def __call__(self, match: str) -> bool:
        return self.low <= sum(ch.isdigit() for ch in match) <= self.high


def _luhn_ok(digits: str) -> bool:
    """The check digit every payment card carries; 9 in 10 random digit strings fail it."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_card(number: str) -> bool:
    digits = number.replace(" ", "").replace("-", "")
    return _CARD_ISSUER.match(digits) is not None and _luhn_ok(digits)


def _is_public_ip(address: str) -> bool:
    """Only globally routable unicast addresses point at someone; private, loopback,
    link-local, site-local, documentation, reserved and multicast ranges are shared by all."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return ip.is_global and not (ip.is_reserved or ip.is_multicast or site_local)


@dataclass(frozen=True)
class _Rule:
    """One kind of personal data: candidates by pattern, confirmed by `accept`."""

    kind: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool] | None = None
    # A character every match contains: texts without it skip the regex.
    needs: str = ""

    def apply(self, text: str) -> tuple[str, int]:
        if self.needs not in text:
            return text, 0
        placeholder = f"<{self.kind.upper()}>"
        hits = 0

        def substitute(m: re.Match[str]) -> str:
            nonlocal hits
            if self.accept is None or self.accept(m.group(0)):
                hits += 1
                return placeholder
            return m.group(0)

        return self.pattern.sub(substitute, text), hits


# Applied in this order: e-mails first so their digits are not read as phones; cards and IPs
# before phones, which could otherwise take a fragment of one.
_RULES = (
    _Rule("email", _EMAIL, needs="@"),
    _Rule("card", _CARD, _is_card),
    _Rule("ip_address", _IPV4, _is_public_ip, needs="."),
    _Rule("ip_address", _IPV6, _is_public_ip, needs=":"),
    _Rule("phone", _PHONE_INTL, _DigitCount(8, 15), needs="+"),
    _Rule("phone", _PHONE_NANP),
    _Rule("phone", _PHONE_EU, _DigitCount(9, 12)),
)


def redact(text: str, *, emails: bool = True, phones: bool = True, ips: bool = True,
           cards: bool = True) -> tuple[str, dict[str, int]]:
    """Replace the chosen kinds with <EMAIL>, <PHONE>, <IP_ADDRESS>, <CARD>; returns the text
    and {kind: count} for kinds found (email, phone, ip_address, card)."""
    enabled = {"email": emails, "phone": phones, "ip_address": ips, "card": cards}
    counts: dict[str, int] = {}
    for rule in _RULES:
        if enabled[rule.kind]:
            text, hits = rule.apply(text)
            if hits:
                counts[rule.kind] = counts.get(rule.kind, 0) + hits
    return text, counts


@dataclass(frozen=True)
class PIIRedactor:
    """Redacts personal data in place; never drops, and notes counts in `meta["pii"]`."""

    name: ClassVar[str] = "pii"

    emails: bool = True
    phones: bool = True
    ips: bool = True
    cards: bool = True

    def __call__(self, doc: Document) -> Document:
        text, counts = redact(doc.text, emails=self.emails, phones=self.phones, ips=self.ips,
                              cards=self.cards)
        if not counts:
            return doc
        return replace(doc, text=text, meta={**doc.meta, "pii": counts})
