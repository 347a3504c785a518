"""Free text from users, with what identifies a person taken out before it is stored.

:func:`redact` replaces, in this order (so that one match is not counted twice):

- e-mail addresses → ``[email]``;
- card-like numbers (13 to 19 digits, with optional spaces or dashes) that pass the Luhn check
  → ``[card]``;
- IPv4 addresses, and IPv6 addresses (what :mod:`ipaddress` accepts; a time such as 12:30:45
  is not one) → ``[ip]``;
- phone numbers (7 to 15 digits written as one: a leading ``+`` or ``(``, or spaces, dots,
  dashes or parentheses between them) → ``[phone]``;
- any remaining run of 6 or more digits (account, order or id numbers) → ``[number]``.

It returns the text and how many of each kind it replaced: the counts are kept with the text, so
a reviewer can see that something was taken out without seeing it. A digit run that fails Luhn is
not a card, but it is still a long number, and is replaced as one.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

__all__ = ["KINDS", "MAX_TEXT", "luhn_ok", "redact"]

MAX_TEXT = 2000
"""Characters of a report's text kept after redaction (the rest is cut)."""

KINDS = ("email", "card", "ip", "phone", "number")

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_CARD = re.compile(r"(?<![\d])(?:\d[ -]?){12,18}\d(?![\d])")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
                   r"(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_PHONE = re.compile(r"(?<![\w])\+?\(?\d(?:[ .()-]{0,2}\d){6,14}(?![\w])")
_DIGITS = re.compile(r"\d{6,}")


def luhn_ok(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum (as payment card numbers do)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _looks_like_phone(text: str) -> bool:
    """Written as a phone number: a ``+`` or ``(`` first, or separators between the digits (a
    bare run of digits is a number of some other kind, redacted as one)."""
    return text.startswith(("+", "(")) or bool(re.search(r"\d[ .()-]+\d", text))


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def redact(text: str) -> tuple[str, Counter[str]]:
    """``text`` with personal details replaced by placeholders, and the count of each kind."""
    counts: Counter[str] = Counter()

    def sub(pattern: re.Pattern[str], kind: str, value: str,
            keep: Callable[[str], bool] | None = None) -> str:
        def replace(m: re.Match[str]) -> str:
            if keep is not None and not keep(m.group()):
                return m.group()
            counts[kind] += 1
            return f"[{kind}]"
        return pattern.sub(replace, value)

    out = text[: MAX_TEXT * 2]  # bound the work on a hostile text before the patterns run
    out = sub(_EMAIL, "email", out)
    out = sub(_CARD, "card", out, lambda s: luhn_ok(re.sub(r"\D", "", s)))
    out = sub(_IPV4, "ip", out)
    out = sub(_IPV6, "ip", out, _is_ipv6)
    out = sub(_PHONE, "phone", out, _looks_like_phone)
    out = sub(_DIGITS, "number", out)
    return out[:MAX_TEXT], counts
