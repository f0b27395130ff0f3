"""Secrets and personal data, found by pattern and replaced by placeholders (no I/O here).

One set of patterns for every place text leaves Reef's hands or is kept for long: turns
sent to the judge (``services.scorer``) and to the skill-evolution LLM
(``services.skill_miner``), the text of mined skills, and the check that keeps a turn
holding secrets out of a Tinker training batch (``services.trainer``). A match becomes
``[REDACTED_<KIND>]``; the kinds are the labels of the redaction metrics.

Patterns are deliberately specific: a false redaction costs the judge a few characters, a
missed one sends a credential to a third party. Numbers that only look like card or phone
numbers get a second look (the Luhn checksum, a digit count), so dates, versions and
ordinary counts stay.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from shared.settings import Settings

_Check = Callable[[str], bool]
"""A second look at a match (a checksum, a digit count); False keeps the text."""

PHONE_MIN_DIGITS = 9
"""A digit group with fewer digits is not taken for a phone number (dates, versions)."""
CUSTOM = "custom"
"""The kind of a match of one of ``redact_patterns`` (the settings' extra patterns)."""

@dataclass(frozen=True, slots=True)
class Rule:
    """One kind of secret: its pattern, its placeholder, and a cheap test that must pass
    before the pattern runs. Scanning 5,000 characters costs each pattern ~0.15-0.6 ms
    here; a substring test or one simple scan costs microseconds, and most texts hold no
    secret at all."""

    kind: str
    pattern: re.Pattern[str]
    replacement: str
    needles: tuple[str, ...] = ()
    """The pattern runs only if one of these occurs in the text (lower-cased when
    ``lower``); empty: no substring test."""
    lower: bool = False
    prefilter: re.Pattern[str] | None = None
    """The pattern runs only if this (simpler) one is found."""

    def may_match(self, text: str, lowered: str) -> bool:
        if self.needles and not any(n in (lowered if self.lower else text)
                                    for n in self.needles):
            return False
        return self.prefilter is None or self.prefilter.search(text) is not None


_DIGIT_RUN = re.compile(r"\d[\d\s().+-]{7,}\d")
"""Nine characters or more from a digit to a digit: every card and phone number has one."""

PATTERNS: tuple[Rule, ...] = (
    Rule("private_key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*"
                                   r"PRIVATE KEY-----", re.DOTALL), "[REDACTED_PRIVATE_KEY]",
         needles=("PRIVATE KEY",)),
    Rule("url_credentials", re.compile(r"\b([a-z][a-z0-9+.-]*://)[^\s/@:]*:[^\s/@]+@",
                                       re.IGNORECASE), r"\1[REDACTED_CREDENTIALS]@",
         needles=("://",)),
    Rule("bearer", re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE),
         r"\1 [REDACTED_TOKEN]", needles=("bearer",), lower=True),
    Rule("jwt", re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}"), "[REDACTED_TOKEN]",
         needles=("eyJ",)),
    Rule("api_key", re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{16,}"),
         "[REDACTED_API_KEY]", needles=("sk-", "pk-", "rk-")),
    Rule("api_key", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
                               r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{30,}"
                               r"|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,})"),
         "[REDACTED_API_KEY]", needles=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
                                        "xox", "AIza", "hf_", "glpat-")),
    Rule("aws_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
         "[REDACTED_AWS_KEY]", needles=("AKIA", "ASIA", "AGPA", "AIDA", "AROA")),
    Rule("secret_assignment", re.compile(
        r"(?i)\b((?:aws_)?(?:secret(?:_access)?_key|api[_-]?key|access[_-]?token|auth[_-]?token"
        r"|password|passwd|pwd|secret|token|client[_-]?secret)[\"']?\s*[:=]\s*[\"']?)"
        r"(?!\[REDACTED)[^\s\"',;]{6,}"), r"\1[REDACTED_SECRET]",
         needles=("key", "token", "passw", "pwd", "secret"), lower=True),
    Rule("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
         "[REDACTED_EMAIL]", needles=("@",)),
    Rule("ip", re.compile(r"(?<![\w.])(?!127\.0\.0\.1(?![\d.]))(?!0\.0\.0\.0(?![\d.]))"
                          r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
                          r"(?![\w.]*\d)"), "[REDACTED_IP]", prefilter=re.compile(r"\d\.\d")),
    Rule("card", re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"), "[REDACTED_CARD]",
         prefilter=_DIGIT_RUN),
    Rule("phone", re.compile(r"(?<![\w.+-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?"
                             r"\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w.-]*\d)"), "[REDACTED_PHONE]",
         prefilter=_DIGIT_RUN),
)
"""Applied in order (keys before the generic patterns)."""


def _luhn(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        doubled = digit * 2 if i % 2 else digit
        total += doubled - 9 if doubled > 9 else doubled
    return total % 10 == 0


def _phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if digits < PHONE_MIN_DIGITS or digits > 15:
        return False
    # An ISO date or a version is not a phone number: 2024-10-21, 1.2.3
    return not re.fullmatch(r"\d{4}-\d{2}-\d{2}", candidate.strip())


_CHECKS: dict[str, _Check] = {"card": _luhn, "phone": _phone}


class Redactor:
    """The built-in patterns, plus ``extra`` regular expressions (kind ``custom``)."""

    def __init__(self, extra: Sequence[str] = ()) -> None:
        self.patterns = PATTERNS + tuple(
            Rule(CUSTOM, re.compile(p), f"[REDACTED_{CUSTOM.upper()}]") for p in extra)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """``text`` with every match replaced by its placeholder, and the count per kind."""
        found: Counter[str] = Counter()
        lowered = text.lower()
        for rule in self.patterns:
            if not rule.may_match(text, lowered):
                continue
            kind, pattern, replacement = rule.kind, rule.pattern, rule.replacement
            check_match = _CHECKS.get(kind)

            def substitute(match: re.Match[str], kind: str = kind,
                           replacement: str = replacement,
                           check_match: _Check | None = check_match) -> str:
                if check_match is not None and not check_match(match.group(0)):
                    return match.group(0)
                found[kind] += 1
                return match.expand(replacement)

            text = pattern.sub(substitute, text)
        return text, found

    def find(self, texts: Iterable[str]) -> str | None:
        """The kind of the first secret or personal datum in ``texts``, or None."""
        for text in texts:
            found = self.redact(text)[1]
            if found:
                return next(iter(found))
        return None

    def redact_messages(self, messages: list[dict[str, Any]]
                        ) -> tuple[list[dict[str, Any]], Counter[str]]:
        """Chat messages with the text of every string ``content`` redacted (and of the
        ``text`` of content parts); other fields are kept as they are."""
        total: Counter[str] = Counter()
        out: list[dict[str, Any]] = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                content, found = self.redact(content)
                total.update(found)
            elif isinstance(content, list):
                content = [self._redact_part(part, total) for part in content]
            out.append({**message, "content": content})
        return out, total

    def _redact_part(self, part: Any, total: Counter[str]) -> Any:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            text, found = self.redact(part["text"])
            total.update(found)
            return {**part, "text": text}
        return part


DEFAULT = Redactor()
"""The built-in patterns only."""


def redact(text: str) -> tuple[str, Counter[str]]:
    """``text`` with secrets and personal data replaced by ``[REDACTED_<KIND>]``
    placeholders, and how many of each kind were replaced (built-in patterns)."""
    return DEFAULT.redact(text)


def outbound_redactor(settings: Settings) -> Redactor | None:
    """The redactor for text leaving Reef (judge, miner LLM, Tinker), or None when
    ``redact_outbound`` is off."""
    if not settings.redact_outbound:
        return None
    return _redactor(tuple(settings.redact_patterns))


@lru_cache(maxsize=8)
def _redactor(extra: tuple[str, ...]) -> Redactor:
    return DEFAULT if not extra else Redactor(extra)


def sensitive_for_tinker(settings: Settings, messages: Iterable[dict[str, Any]]) -> str | None:
    """Why a turn must not be trained on Tinker: the kind of the first secret or personal
    datum in its ``messages`` (the prompt as sent, then the answer), or None.

    A Tinker datum carries the token ids the policy sampled; editing them would break the
    importance ratios of RL, so a turn holding a secret is dropped from training instead
    of redacted. Applies to the Tinker backend with ``redact_outbound`` on (the local
    backend's data never leaves the machine)."""
    redactor = outbound_redactor(settings)
    if settings.backend != "tinker" or redactor is None:
        return None
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts.append(str(function.get("arguments", "")))
    return redactor.find(texts)
