"""On-policy distillation: a teacher scores the student's own samples, token by token.

For each sampled completion the teacher gives the log-probability of every sampled token
(an OpenAI-compatible ``/v1/completions`` endpoint in scoring mode: the token ids as
``prompt``, ``echo: true``, ``logprobs: 1``, ``max_tokens: 0`` — as vLLM and Reef's
policy server answer). The per-token advantage is

    A_t = kl_penalty_coef * (log p_teacher(x_t) - log p_student(x_t))

with the student's logprob as the sampler reported it: minimising the reverse KL from the
student to the teacher on the student's own samples. Both must share a tokenizer (the
ids mean the same tokens), which ``Teacher.check_tokenizer`` verifies before any training.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from services.trainer.backend import StepError
from shared.settings import ConfigError, Settings

PROBE = "Reef checks tokenizers: naïve café, 12,345 tokens — done!\n"
"""Text whose tokenization differs between most tokenizers (accents, digits, dashes)."""


class TeacherError(StepError):
    """The teacher could not score a sequence (``transient``: unreachable, timed out, a
    server error or a rate limit)."""


class Teacher:
    """Client of the teacher's scoring endpoint."""

    def __init__(self, settings: Settings) -> None:
        if not settings.teacher_base_url or not settings.teacher_model:
            raise ConfigError("mode opd needs teacher_base_url (REEF_TEACHER_BASE_URL) and "
                              "teacher_model (REEF_TEACHER_MODEL)")
        self._url = settings.teacher_base_url.rstrip("/") + "/completions"
        self._model = settings.teacher_model
        self._timeout = aiohttp.ClientTimeout(total=settings.judge_timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _score(self, prompt: str | list[int]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = {"model": self._model, "prompt": prompt, "echo": True, "logprobs": 1,
                "max_tokens": 0}
        try:
            async with self._session.post(self._url, data=orjson.dumps(body),
                                          headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                if r.status >= 400:
                    raise TeacherError(f"teacher answered {r.status}: {raw[:200]!r}",
                                       transient=r.status >= 500 or r.status == 429)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TeacherError(f"teacher unreachable ({type(exc).__name__})",
                               transient=True) from exc
        logprobs = orjson.loads(raw)["choices"][0].get("logprobs") or {}
        if not logprobs.get("token_logprobs"):
            raise TeacherError("teacher returned no token_logprobs (needs echo + logprobs)")
        return dict(logprobs)

    async def logprobs(self, tokens: list[int]) -> list[float]:
        """The teacher's logprob of each of ``tokens[1:]`` given the ones before it."""
        values = (await self._score(tokens))["token_logprobs"]
        if len(values) != len(tokens):
            raise TeacherError(f"teacher scored {len(values)} of {len(tokens)} tokens")
        return [float(v) for v in values[1:]]

    async def check_tokenizer(self, student_tokens: list[str]) -> None:
        """Refuse a teacher whose tokenizer splits ``PROBE`` differently from the student's
        (``student_tokens``: the student's token strings for ``PROBE``)."""
        teacher_tokens = (await self._score(PROBE))["tokens"]
        if list(teacher_tokens) != list(student_tokens):
            raise ConfigError(
                f"teacher {self._model!r} and the student tokenize differently "
                f"({len(teacher_tokens)} vs {len(student_tokens)} tokens for a probe text): "
                "on-policy distillation needs a shared tokenizer")


def opd_advantages(sampler_lps: list[float], teacher_lps: list[float],
                   coef: float) -> list[float]:
    """Per-token advantages of a completion (see the module docstring)."""
    return [coef * (t - s) for s, t in zip(sampler_lps, teacher_lps, strict=True)]
