"""The miner LLM's answer: strict JSON, validated with pydantic (no I/O here).

The expected shape::

    {"diagnosis": "what went wrong, in a few sentences",
     "skills": [{"name": "kebab-case", "description": "one line: when it applies",
                 "category": "coding", "body": "Markdown instructions"}]}

The limits are the skill store's, so a valid proposal is always storable. A reply wrapped in
a Markdown code fence, or preceded by a ``<think>`` block, is accepted; anything else that is
not exactly one such JSON object is invalid (``InvalidAnswer``, whose message goes back to
the LLM for its one retry).
"""

from __future__ import annotations

import re

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.skill_store import (
    CATEGORY_RE,
    MAX_BODY_CHARS,
    MAX_CATEGORY_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_NAME_CHARS,
    NAME_RE,
)

MAX_DIAGNOSIS_CHARS = 4000
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


class InvalidAnswer(ValueError):
    """The LLM's reply is not the JSON the prompt asked for; the message says why."""


class SkillProposal(BaseModel):
    """One proposed skill."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    description: str = Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)
    category: str = Field("general", min_length=1, max_length=MAX_CATEGORY_CHARS)
    body: str = Field(min_length=1, max_length=MAX_BODY_CHARS)

    @field_validator("name")
    @classmethod
    def _kebab(cls, name: str) -> str:
        if not NAME_RE.match(name):
            raise ValueError("must be kebab-case: lowercase words of letters and digits "
                             "joined by single hyphens")
        return name

    @field_validator("description")
    @classmethod
    def _one_line(cls, description: str) -> str:
        if "\n" in description:
            raise ValueError("must be one line")
        return description

    @field_validator("category", mode="before")
    @classmethod
    def _category(cls, category: object) -> object:
        if isinstance(category, str):
            category = "-".join(category.strip().lower().split()) or "general"
            if not CATEGORY_RE.match(category):
                raise ValueError("must be lowercase letters, digits, '-' and '_'")
        return category


class MinerAnswer(BaseModel):
    """The whole answer: a diagnosis and the proposed skills (possibly none)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    diagnosis: str = Field(max_length=MAX_DIAGNOSIS_CHARS)
    skills: list[SkillProposal]


def parse_answer(text: str | None, max_skills: int) -> MinerAnswer:
    """The validated answer in a reply, keeping at most ``max_skills`` proposals (the
    first ones); raises ``InvalidAnswer``."""
    if not text or not text.strip():
        raise InvalidAnswer("the reply was empty")
    body = _THINK.sub("", text).strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidAnswer(f"the reply is not one JSON object ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidAnswer("the reply must be a JSON object, not "
                            f"{type(data).__name__}")
    try:
        answer = MinerAnswer.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors(include_input=False)[:5])
        raise InvalidAnswer(f"the JSON does not match the schema: {problems}") from None
    if len(answer.skills) > max_skills:
        answer = answer.model_copy(update={"skills": answer.skills[:max(0, max_skills)]})
    return answer
