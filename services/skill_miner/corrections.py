"""Skills from the user's own corrections, with no LLM: the miner's offline proposer.

When a user answers a failing turn with an explicit instruction - "No, that's wrong: too
long. Answer in at most 12 words." - that instruction is the lesson, in the user's own
words. This proposer (``miner_backend = "corrections"``) takes the imperative sentences of
the follow-up to a failing turn and proposes them as one *preference* skill: a standing
instruction the gateway injects into every main turn of the tenant (see
``skill_always_categories``), not only into turns that resemble the one that failed. It
needs no API key, so the local demo and air-gapped installs mine skills too; an LLM
(``miner_backend = "llm"``, the default) diagnoses failures this cannot: wrong facts, bad
tool calls, corrections phrased as complaints.

A sentence is an instruction when it starts (after "please", "just", "and") with one of
:data:`IMPERATIVE_VERBS` or with "don't"/"never"/"always". The same instruction mined twice
gives the same name, so the curator's dedupe turns repeats into no-ops rather than new
skills. Safety checks and redaction still apply: the curator runs them on every proposal.
"""

from __future__ import annotations

import re

from services.skill_miner.proposals import MinerAnswer, SkillProposal
from services.skill_miner.trajectory import TurnRecord
from shared.skill_store import MAX_NAME_CHARS
from shared.skills import Skill

PREFERENCE_CATEGORY = "preference"
"""The category of mined instructions; the gateway injects it into every main turn."""
IMPERATIVE_VERBS = frozenset((
    "answer", "reply", "respond", "be", "keep", "use", "write", "give", "include", "add",
    "start", "end", "stop", "avoid", "put", "say", "show", "explain", "format", "list",
    "cite", "mention", "name", "limit", "make", "try", "remember", "call", "speak", "check",
    "ask", "prefer"))
_FILLER = ("please", "just", "and", "also", "so", "then")
_SENTENCE = re.compile(r"[^.!?;\n]+[.!?]?")
_WORD = re.compile(r"[a-z0-9]+")
MAX_INSTRUCTION_CHARS = 300
"""Longer sentences are explanations, not instructions."""


def instructions(follow_up: str) -> list[str]:
    """The imperative sentences of ``follow_up`` (``role: text`` lines, as trajectories
    keep them; only the user's lines count), in order, without repeats."""
    found: list[str] = []
    for line in follow_up.splitlines():
        role, _, text = line.partition(": ")
        if role != "user":
            continue
        for raw in _SENTENCE.findall(text.replace(":", ".")):
            sentence = _strip_filler(raw.strip())
            if not sentence or len(sentence) > MAX_INSTRUCTION_CHARS:
                continue
            words = sentence.lower().replace("\u2019", "'").split()
            first = words[0].strip(",")
            if first in IMPERATIVE_VERBS or first in ("don't", "never", "always") or (
                    first == "do" and len(words) > 1 and words[1] == "not"):
                sentence = sentence[0].upper() + sentence[1:]
                if not sentence.endswith((".", "!", "?")):
                    sentence += "."
                if sentence not in found:
                    found.append(sentence)
    return found


def _strip_filler(sentence: str) -> str:
    words = sentence.split()
    while words and words[0].lower().strip(",") in _FILLER:
        words.pop(0)
    return " ".join(words)


def skill_name(instruction: str) -> str:
    """A kebab-case name from the instruction's words (cut at a word boundary)."""
    name = ""
    for word in _WORD.findall(instruction.lower()):
        candidate = f"{name}-{word}" if name else word
        if len(candidate) > MAX_NAME_CHARS:
            break
        name = candidate
    return name or "user-preference"


def proposal_for(instruction: str) -> SkillProposal:
    return SkillProposal(
        name=skill_name(instruction),
        description=f"A standing preference the user stated when correcting an answer: "
                    f"{instruction}",
        category=PREFERENCE_CATEGORY,
        body=f"The user asked for this after an earlier answer: {instruction} "
             "Follow it in every answer.")


class CorrectionsProposer:
    """Proposes one preference skill per instruction in the failing turn's follow-up."""

    needs_context = False

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def propose(self, session: list[TurnRecord], failing: TurnRecord,
                      existing: list[Skill], max_skills: int) -> MinerAnswer | None:
        found = instructions(failing.follow_up)[:max(0, max_skills)]
        diagnosis = ("The user corrected the answer: " + " ".join(found) if found
                     else "No explicit instruction in the user's follow-up.")
        return MinerAnswer(diagnosis=diagnosis, skills=[proposal_for(i) for i in found])
