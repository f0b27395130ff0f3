"""What a mined skill may not say, and what it may not keep (no I/O here).

A skill is text injected into the system prompt of later turns: a proposal that tells the
agent to send data somewhere, reveal credentials or its system prompt, drop its safeguards
or run arbitrary shell would be a prompt injection that Reef itself installed. ``check``
finds such proposals by rules, each with a reason (a metric label); ``redact`` replaces
secrets and personal data that slipped into a skill's text with placeholders.

The rules are deliberately conservative: a false rejection costs one proposal, a false
acceptance reaches every later prompt of the tenant. Rules about *doing* something
(revealing, ignoring) do not fire when the sentence forbids it ("Never reveal API keys");
rules about dangerous commands and data leaving to a URL fire regardless.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared import redact as shared_redact

REASON_EXFILTRATION = "exfiltration"
REASON_SECRETS = "reveal_secrets"
REASON_SYSTEM_PROMPT = "reveal_system_prompt"
REASON_SAFEGUARDS = "disable_safeguards"
REASON_SHELL = "arbitrary_shell"
REASONS = (REASON_EXFILTRATION, REASON_SECRETS, REASON_SYSTEM_PROMPT, REASON_SAFEGUARDS,
           REASON_SHELL)
"""Every rejection reason (``rejected_<reason>`` in the proposal metrics)."""

_F = re.IGNORECASE | re.DOTALL

_URL = (r"(?:https?://|ftp://|wss?://|www\.|\b[\w-]+(?:\.[\w-]+)*\."
        r"(?:com|net|org|io|ru|cn|xyz|top|site|app|dev|me|co|info|biz)\b|\b\d{1,3}(?:\.\d{1,3}){3}\b"
        r"|\bwebhook|\bngrok|\bpastebin|\brequestbin|\bdiscord\.gg)")
_SEND = (r"\b(?:send|sends|sending|post|posts|posting|upload|uploads|forward|forwards|transmit"
         r"|submit|exfiltrate|leak|report|reports|sync|mirror|copy|copies|share|beacon|ping"
         r"|log|push|email|e-mail|curl|wget|fetch)\b")
_REVEAL = (r"\b(?:reveal|print|show|output|share|disclose|include|repeat|leak|tell|send|echo"
           r"|dump|display|expose|recite|return|give|paste|write out|list)\b")
_SECRET = (r"(?:\bapi[\s_-]?keys?\b|\bapikeys?\b|\bsecrets?\b|\bpasswords?\b|\bcredentials?\b"
           r"|\b(?:access|auth|bearer|session)[\s_-]?tokens?\b|\bprivate[\s_-]?keys?\b"
           r"|\benv(?:ironment)?[\s_-]?var(?:iable)?s?\b|\.env\b|\bssh[\s_-]?keys?\b"
           r"|\bcookies?\b)")
_SYSTEM = (r"(?:\bsystem[\s_-]?(?:prompt|message|instructions?)\b|\bhidden[\s_-]?instructions?\b"
           r"|\b(?:initial|original|developer|internal)[\s_-]?(?:prompt|instructions?|message)\b"
           r"|\byour[\s_-]?(?:instructions|prompt|rules|guidelines)\b)")
_IGNORE = (r"\b(?:ignore|disregard|forget|override|bypass|circumvent|skip|drop|abandon|violate)"
           r"\s+(?:\w+\s+){0,3}?(?:instructions?|rules?|guidelines?|polic(?:y|ies)|safety"
           r"|safeguards?|guardrails?|restrictions?|filters?|constraints?|system[\s_-]?prompt)\b")
_DISABLE = (r"\b(?:disable|turn\s+off|switch\s+off|deactivate|remove|bypass|circumvent|skip"
            r"|evade|get\s+around)\s+(?:\w+\s+){0,3}?(?:safety|safeguards?|guardrails?"
            r"|content[\s_-]?filters?|moderation|confirmations?|sandbox(?:ing)?|security"
            r"|protections?|checks?|approvals?)\b")
_JAILBREAK = r"\b(?:jailbreak|developer\s+mode|DAN\s+mode|do\s+anything\s+now|no\s+restrictions)\b"

_SHELL_PATTERNS = (
    r"\brm\s+-[a-z]*[rf][a-z]*\b",  # rm -rf, rm -fr, rm -r
    r"\bmkfs(?:\.\w+)?\b", r"\bdd\s+if=", r":\(\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:",
    r"\bchmod\s+(?:-R\s+)?0?777\b", r"\bchown\s+-R\b",
    r"\b(?:curl|wget)\b[^\n|]*\|\s*(?:sudo\s+)?(?:ba|z|k)?sh\b",  # curl ... | sh
    r"\bbase64\s+(?:-d|--decode)\b[^\n|]*\|\s*(?:ba|z)?sh\b",
    r"\bsudo\b", r"\bnc\s+(?:-\w+\s+)*-e\b", r"/dev/tcp/", r"\bpowershell\b[^\n]*-enc",
    r"\bos\.system\s*\(", r"\bsubprocess\.\w+\s*\(", r"\beval\s*\(", r"\bexec\s*\(",
    r"\b(?:shutdown|reboot|killall)\b", r">\s*/dev/sd[a-z]",
    r"\b(?:run|execute|exec)\s+(?:\w+\s+){0,2}?(?:any|arbitrary|whatever|all)\s+(?:\w+\s+)?"
    r"(?:shell\s+)?commands?\b",
    r"\b(?:run|execute)\s+(?:\w+\s+){0,3}?commands?\s+(?:\w+\s+){0,3}?without\s+"
    r"(?:asking|confirmation|approval|checking)",
)

_NEGATION = re.compile(
    r"\b(?:never|not|don't|dont|do\s+not|must\s+not|mustn't|should\s+not|shouldn't|cannot"
    r"|can't|won't|avoid|refuse(?:\s+to)?|no)\b(?:\s+\w+){0,3}\s*$", re.IGNORECASE)
"""A negation in the few words right before a rule's verb: "never reveal", "do not ever
share". Words that turn a negation into an encouragement are checked separately."""
_FALSE_NEGATION = re.compile(
    r"\b(?:hesitate|forget|fail|be\s+afraid|be\s+shy|stop|neglect|refuse\s+not)\b",
    re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Rule:
    """One safety rule: a pattern and whether a negated sentence escapes it."""

    reason: str
    pattern: re.Pattern[str]
    negatable: bool


RULES: tuple[Rule, ...] = (
    Rule(REASON_EXFILTRATION, re.compile(rf"{_SEND}[^.\n]*?{_URL}", _F), negatable=False),
    Rule(REASON_EXFILTRATION, re.compile(rf"{_URL}[^.\n]*?{_SEND}", _F), negatable=False),
    Rule(REASON_SECRETS, re.compile(rf"{_REVEAL}[^.\n]{{0,60}}?{_SECRET}", _F), negatable=True),
    Rule(REASON_SYSTEM_PROMPT, re.compile(rf"{_REVEAL}[^.\n]{{0,60}}?{_SYSTEM}", _F),
         negatable=True),
    Rule(REASON_SAFEGUARDS, re.compile(_IGNORE, _F), negatable=True),
    Rule(REASON_SAFEGUARDS, re.compile(_DISABLE, _F), negatable=True),
    Rule(REASON_SAFEGUARDS, re.compile(_JAILBREAK, _F), negatable=False),
    *(Rule(REASON_SHELL, re.compile(p, _F), negatable=False) for p in _SHELL_PATTERNS),
)
"""Checked in order; the first that fires gives the rejection reason."""


def check(*texts: str) -> str | None:
    """The reason to reject a skill made of ``texts`` (name, description, body ...), or
    None when no rule fires."""
    for rule in RULES:
        for text in texts:
            for match in rule.pattern.finditer(text):
                if not (rule.negatable and _negated(text, match.start())):
                    return rule.reason
    return None


def _negated(text: str, start: int) -> bool:
    """Whether the clause before ``start`` negates what follows ("Never reveal ...")."""
    clause = re.split(r"[.!?;:\n]", text[max(0, start - 80):start])[-1]
    return bool(_NEGATION.search(clause)) and not _FALSE_NEGATION.search(clause)


# --- redaction ------------------------------------------------------------------------
# The patterns live in ``shared.redact`` (one set for skills, judge and miner prompts, and
# Tinker); ``safety.redact`` stays the name the curator uses.
redact = shared_redact.redact
