"""Drawing one token from a position's logits, and the logprobs reported for it.

**Processed logprobs** (the default, ``logprobs_mode = "processed_logprobs"``, as vLLM names
it) are the log-probabilities of the distribution the token was actually drawn from: the
logits divided by the temperature, cut to the ``top_k`` most likely tokens, then to the
smallest set holding ``top_p`` of the mass, renormalised over the tokens kept. That is the
behaviour policy's probability, which an importance ratio needs: a trainer that scores the
same tokens under its own (untempered) weights divides by it. Greedy decoding (temperature
0) draws the most likely token with probability 1: its processed logprob is 0, and the
answer is marked greedy (it carries no importance ratio).

**Raw logprobs** (``"raw_logprobs"``) are ``log_softmax(logits)`` of the model, whatever the
sampling: what the model itself says, equal to processed ones only at temperature 1 with
no cut. A past measurement (the engine's docstring before this module) chose them because
the first training step's ratios then start at exactly 1; they are still available per
request (``logprobs_mode``) or by setting (``policy_logprobs_mode``).

``top_logprobs`` alternatives come from the same distribution as the token's logprob; a
token outside the kept set has probability 0 there and is reported as ``-9999.0`` (JSON
has no infinity; vLLM does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LogprobsMode = Literal["processed_logprobs", "raw_logprobs"]
"""vLLM's names for the two kinds this server can report."""
EXCLUDED_LOGPROB = -9999.0
"""Reported for a token the sampling cut excluded (probability 0)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request's answers."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (0 or -1: no cut)."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    """How many most likely alternatives to report per position (0: none)."""
    logprobs_mode: LogprobsMode = "processed_logprobs"

    @property
    def greedy(self) -> bool:
        """Every token is the most likely one: temperature 0, or a top-k of 1."""
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def logprobs_kind(self) -> Literal["processed", "raw"]:
        """What the reported logprobs are of (the turn's ``logprobs_kind``)."""
        return "raw" if self.logprobs_mode == "raw_logprobs" else "processed"


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One sampled token with its logprob and, when asked, the best alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                       top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities (float32) of the distribution sampling draws from: ``logits`` /
    ``temperature``, cut to ``top_k`` tokens (0 or -1: none), then to the smallest set of
    most likely tokens whose mass reaches ``top_p``, renormalised over what was kept;
    ``-inf`` for every token cut. Temperature must be above 0 (greedy has no distribution
    to compute: see :func:`sample`)."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        cut_sorted = before >= top_p  # the most likely token always survives
        cut = torch.zeros_like(cut_sorted).scatter_(-1, order, cut_sorted)
        scaled = scaled.masked_fill(cut, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator) -> SampledToken:
    """Draw a token from one position's logits; its logprob (and alternatives) of the kind
    ``params.logprobs_mode`` names (see the module docstring)."""
    raw = params.logprobs_mode == "raw_logprobs"
    if params.temperature <= 0.0:
        token_id = int(torch.argmax(logits))
        if raw:
            reported = torch.log_softmax(logits.float(), dim=-1)
        else:  # a point mass on the chosen token
            reported = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            reported[token_id] = 0.0
    else:
        processed = processed_logprobs(logits, params.temperature, params.top_k, params.top_p)
        token_id = int(torch.multinomial(processed.exp(), 1, generator=generator))
        reported = torch.log_softmax(logits.float(), dim=-1) if raw else processed
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs > 0:
        top = _alternatives(reported, logits, params.top_logprobs)
    return SampledToken(token_id, _finite(float(reported[token_id])), top)


def _alternatives(reported: torch.Tensor, logits: torch.Tensor, k: int
                  ) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely tokens under ``reported``; tokens the cut excluded (all
    ``-inf`` there) follow in the model's own order."""
    order = torch.where(torch.isfinite(reported), reported,
                        logits.float() - logits.float().max() - 1e6)
    ids = torch.topk(order, k).indices
    return tuple((int(i), _finite(float(reported[i]))) for i in ids)


def _finite(logprob: float) -> float:
    return logprob if logprob > EXCLUDED_LOGPROB else EXCLUDED_LOGPROB
