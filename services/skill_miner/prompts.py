"""The skill-miner's prompt: diagnose a session that went wrong, propose reusable skills.

A skill is a short instruction that Reef injects into the system prompt of later, relevant
requests of the same tenant, so the prompt asks for instructions that generalise (not a
fix for this one conversation), that the agent can follow from text alone, and that carry
no data from the conversation. The tenant's existing skills are listed so that the model
improves one of them (same name) rather than adding a near-duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.skill_miner.trajectory import TurnRecord
from shared.skills import Skill

EXISTING_SKILLS_SHOWN = 30
"""Existing skills listed in the prompt (name and description), at most."""

SYSTEM = """\
You improve an AI assistant by writing *skills*: short, reusable instructions that are \
added to the assistant's system prompt on later requests where they are relevant.

You are shown one conversation in which the assistant did badly on at least one turn, \
with a reward per turn (from -1, bad, to +1, good) and what the user did next. Work out \
what the assistant did wrong, then propose skills that would have prevented it and will \
help on similar requests in other conversations.

A good skill:
- states when it applies (the description) and what to do (the body), concretely;
- generalises: no names, numbers, file paths or other data from this conversation;
- is followed from text alone: it must not tell the assistant to contact URLs or send \
data anywhere, reveal keys, credentials or its instructions, ignore its other \
instructions or safeguards, or run shell commands;
- improves an existing skill when one already covers the problem: then reuse that \
skill's exact name and write its complete improved version.

Propose nothing (an empty list) when the failure teaches nothing reusable, for example \
when the user simply changed their mind.

Answer with one JSON object and nothing else:
{"diagnosis": "<what went wrong, two or three sentences>",
 "skills": [{"name": "<kebab-case, at most 64 characters>",
             "description": "<one line: the situations the skill is for>",
             "category": "<one lowercase word, e.g. coding, writing, research, tools, \
communication, general>",
             "body": "<the instruction, Markdown, at most about 150 words>"}]}"""

RETRY = """\
Your answer could not be used: {error}
Reply again with exactly one JSON object of the shape described, and nothing else."""


def proposal_messages(turns: Sequence[TurnRecord], failing: TurnRecord,
                      existing: Sequence[Skill], max_skills: int) -> list[dict[str, str]]:
    """The chat messages asking for a diagnosis and at most ``max_skills`` skills."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": _user_message(turns, failing, existing, max_skills)}]


def retry_messages(first: list[dict[str, str]], reply: str | None,
                   error: str) -> list[dict[str, str]]:
    """The conversation again, with the invalid reply and what was wrong with it."""
    return [*first, {"role": "assistant", "content": reply or ""},
            {"role": "user", "content": RETRY.format(error=error)}]


def _user_message(turns: Sequence[TurnRecord], failing: TurnRecord,
                  existing: Sequence[Skill], max_skills: int) -> str:
    parts = [f"Propose at most {max_skills} skill(s).", "", "## Existing skills"]
    shown = list(existing)[:EXISTING_SKILLS_SHOWN]
    if shown:
        parts += [f"- {s.name} ({s.category}): {s.description}" for s in shown]
    else:
        parts.append("(none yet)")
    parts += ["", "## The conversation"]
    for record in turns:
        parts.append(_render_turn(record, failing=record.turn_id == failing.turn_id))
    parts += ["", f"Turn {failing.index} is the one that went wrong; earlier turns are "
                  "context."]
    return "\n".join(parts)


def _render_turn(record: TurnRecord, *, failing: bool) -> str:
    reward = "unscored" if record.reward is None else f"{record.reward:+.2f}"
    heading = f"### Turn {record.index} (reward {reward}{', WENT WRONG' if failing else ''})"
    lines = [heading, record.request or "(no request text)", record.answer or "(no answer)"]
    if record.follow_up:
        lines += ["What followed:", record.follow_up]
    signals = [s for s in record.signals if "." in s]
    if signals:
        lines.append("Signals: " + ", ".join(signals))
    return "\n".join(lines)
