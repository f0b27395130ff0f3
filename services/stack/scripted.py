"""A scripted user with a fixed, checkable preference, talking to Reef's gateway.

The user asks short factual questions through the gateway with the official ``openai``
client (one ``X-Session-Id`` per conversation) and reacts to each answer with its next
message, as a person would: ``"Thanks, perfect!"`` when the answer meets the preference,
a correction (``"No, that's wrong: too long. Answer in at most 12 words."``) when it does
not. The scorer turns those messages into rewards (implicit feedback: +1 and -1); no LLM
judge is involved.

The preference is *brevity on topic*: at most :attr:`Preference.max_words` words **and**
one of the question's keywords (the right answer must contain it). Brevity alone is
hacked within a few steps (answers collapse to one word of gibberish or emoji); the
keyword keeps the answers answers. The embedded SmolLM2 meets the limit now and then on
its own (its answers run ~35 words), which is what gives RL a gradient to follow.

The questions are fixed and split into :data:`TRAIN_PROMPTS` (conversations that train)
and :data:`HELDOUT_PROMPTS` (only evaluated, never followed by feedback: their turns end
their session and are recorded untrainable).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import openai

SYSTEM_PROMPT = "You are a helpful assistant."
"""The system message of every conversation (the same for all: prompts form groups)."""
THANKS = "Thanks, perfect!"
"""Reply to an answer that meets the preference (implicit reward +1)."""


@dataclass(frozen=True)
class Prompt:
    """A question and the words of which its right answer contains at least one."""

    question: str
    keywords: tuple[str, ...]


TRAIN_PROMPTS: tuple[Prompt, ...] = (
    Prompt("What is the capital of France?", ("paris",)),
    Prompt("What colour is the sky on a clear day?", ("blue",)),
    Prompt("How many legs does a spider have?", ("eight", "8")),
    Prompt("What do bees make?", ("honey",)),
    Prompt("What is the largest planet in our solar system?", ("jupiter",)),
    Prompt("What is the opposite of hot?", ("cold",)),
    Prompt("Which animal says moo?", ("cow", "cows")),
    Prompt("How many days are there in a week?", ("seven", "7")),
    Prompt("What is frozen water called?", ("ice",)),
    Prompt("Who wrote Romeo and Juliet?", ("shakespeare",)),
    Prompt("What colour are bananas when they are ripe?", ("yellow",)),
    Prompt("What is the capital of Italy?", ("rome",)),
)
HELDOUT_PROMPTS: tuple[Prompt, ...] = (
    Prompt("What is the capital of Japan?", ("tokyo",)),
    Prompt("What colour is grass?", ("green",)),
    Prompt("How many wheels does a bicycle have?", ("two", "2")),
    Prompt("What is the closest star to Earth?", ("sun",)),
    Prompt("What do cows drink?", ("water",)),
    Prompt("What is the capital of Germany?", ("berlin",)),
    Prompt("Which planet is known as the Red Planet?", ("mars",)),
    Prompt("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
)

_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")


def count_words(text: str) -> int:
    """Words as a reader counts them: runs of letters and digits ("don't" is one)."""
    return len(_WORD.findall(text))


@dataclass(frozen=True)
class Verdict:
    """What the scripted user thinks of one answer."""

    ok: bool
    words: int
    on_topic: bool
    reply: str
    """The user's next message: thanks, or a correction saying what was wrong."""

    @property
    def reward(self) -> float:
        """The reward the scorer gives for ``reply`` (+1 thanks, -1 correction)."""
        return 1.0 if self.ok else -1.0


@dataclass(frozen=True)
class Preference:
    """Answers of at most ``max_words`` words that contain one of the prompt's keywords."""

    max_words: int = 12

    def judge(self, prompt: Prompt, answer: str) -> Verdict:
        words = count_words(answer)
        lowered = {w.lower() for w in _WORD.findall(answer)}
        text = answer.lower()
        on_topic = any((k in lowered) if " " not in k and "-" not in k else (k in text)
                       for k in prompt.keywords)
        short = 0 < words <= self.max_words
        if short and on_topic:
            return Verdict(True, words, on_topic, THANKS)
        problems = []
        if not on_topic:
            problems.append("that does not answer my question")
        if not short:
            problems.append(f"too long. Answer in at most {self.max_words} words")
        return Verdict(False, words, on_topic,
                       "No, that's wrong: " + "; and ".join(problems) + ".")


@dataclass(frozen=True)
class Outcome:
    """One answered question and its verdict; ``version`` is the model that answered."""

    prompt: Prompt
    answer: str
    verdict: Verdict
    version: str


@dataclass(frozen=True)
class Evaluation:
    """Held-out results: the mean reward is the scripted check's (what the scorer gives)."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def mean_reward(self) -> float:
        return statistics.fmean(o.verdict.reward for o in self.outcomes)

    @property
    def hit_rate(self) -> float:
        return statistics.fmean(1.0 if o.verdict.ok else 0.0 for o in self.outcomes)

    @property
    def mean_words(self) -> float:
        return statistics.fmean(o.verdict.words for o in self.outcomes)

    @property
    def on_topic_rate(self) -> float:
        return statistics.fmean(1.0 if o.verdict.on_topic else 0.0 for o in self.outcomes)

    @property
    def versions(self) -> Counter[str]:
        return Counter(o.version for o in self.outcomes)

    def summary(self) -> str:
        return (f"mean reward {self.mean_reward:+.3f}, meets preference "
                f"{self.hit_rate:.0%}, on topic {self.on_topic_rate:.0%}, "
                f"{self.mean_words:.1f} words (n={len(self.outcomes)}, "
                f"versions {dict(self.versions)})")


class ScriptedUser:
    """Talks to the gateway at ``base_url`` (its ``/v1``) as a user with ``preference``.

    Requests run ``concurrency`` at a time (the policy server samples one at a time; a
    few in flight hide the HTTP round trips). Answers are at most ``max_tokens`` tokens.
    With ``seed``, each training conversation's first answer is sampled with a seed
    derived from it and the session's name, so two runs with the same seed draw the same
    answers wherever they ask the same question of the same weights.
    """

    def __init__(self, base_url: str, api_key: str, model: str, *,
                 preference: Preference | None = None, max_tokens: int = 40,
                 temperature: float = 1.0, top_p: float = 1.0, concurrency: int = 4,
                 timeout: float = 300.0, seed: int | None = None) -> None:
        self.client = openai.AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1",
                                         api_key=api_key, timeout=timeout, max_retries=1)
        self.model = model
        self.preference = preference or Preference()
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self._slots = asyncio.Semaphore(concurrency)

    async def close(self) -> None:
        await self.client.close()

    async def _complete(self, messages: list[dict[str, str]], session: str, *, done: bool,
                        max_tokens: int, temperature: float, seed: int | None
                        ) -> tuple[str, str]:
        extra: dict[str, Any] = {} if seed is None else {"seed": seed}
        async with self._slots:
            response = await self.client.chat.completions.create(
                model=self.model, messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens, temperature=temperature, top_p=self.top_p,
                extra_headers={"X-Session-Id": session,
                               "X-Session-Done": "true" if done else "false"},
                **extra)
        return response.choices[0].message.content or "", response.model

    async def ask(self, prompt: Prompt, session: str, *, seed: int | None = None,
                  temperature: float | None = None, done: bool = False,
                  max_tokens: int | None = None) -> Outcome:
        """Ask ``prompt`` in a new session; judge the answer (no reply is sent)."""
        answer, version = await self._complete(
            _opening(prompt), session, done=done, max_tokens=max_tokens or self.max_tokens,
            temperature=self.temperature if temperature is None else temperature, seed=seed)
        return Outcome(prompt, answer, self.preference.judge(prompt, answer), version)

    async def converse(self, prompt: Prompt, session: str) -> Outcome:
        """Ask, then reply with thanks or a correction, which ends the session.

        The reply is a real turn (the scorer reads it as the question's follow-up); its
        own answer is not wanted, so it is one token long."""
        seed = None if self.seed is None else (self.seed + zlib.crc32(session.encode())) % 2**31
        outcome = await self.ask(prompt, session, seed=seed)
        messages = [*_opening(prompt), {"role": "assistant", "content": outcome.answer},
                    {"role": "user", "content": outcome.verdict.reply}]
        await self._complete(messages, session, done=True, max_tokens=1,
                             temperature=self.temperature, seed=None)
        return outcome

    async def train_round(self, prompts: Sequence[Prompt], per_prompt: int,
                          tag: str) -> list[Outcome]:
        """``per_prompt`` conversations on each prompt, each in its own session (same
        prompt, same group: the trainer's baseline is the group's mean reward)."""
        jobs = [self.converse(p, f"{tag}-p{i}-s{j}")
                for i, p in enumerate(prompts) for j in range(per_prompt)]
        return list(await asyncio.gather(*jobs))

    async def evaluate(self, prompts: Sequence[Prompt], samples: int, *, tag: str,
                       seed: int = 1234, temperature: float | None = None) -> Evaluation:
        """``samples`` seeded answers per prompt, judged without replying; each turn ends
        its session, so it is recorded but never trained on."""
        jobs = [self.ask(p, f"{tag}-p{i}-s{j}", seed=seed + 1000 * i + j,
                         temperature=temperature, done=True)
                for i, p in enumerate(prompts) for j in range(samples)]
        return Evaluation(list(await asyncio.gather(*jobs)))


def _opening(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt.question}]
