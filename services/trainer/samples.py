"""From scored turns to training datums: exact sampled tokens, behaviour logprobs,
baselines and the batch's normalisation.

A sample is trained on the token ids the policy actually sampled and the logprobs of the
distribution they were drawn from (the *behaviour* policy), never a re-tokenization of the
text. How far those logprobs can be trusted for an importance ratio is the sample's
``behaviour`` (:func:`behaviour_of`); greedy turns, and raw logprobs of a tempered or
truncated sampler, are kept out of the ratio losses.

Advantages (:func:`advantages`): samples answering the same prompt form a group, whose
mean reward is their baseline and whose reward std scales them (GRPO-style). A sample
alone with its prompt in the batch (organic traffic: every prompt differs) is measured
against the adapter's running baseline (:class:`RunningBaseline`), never against
unrelated prompts of the batch unless ``advantage_batch_normalize`` says so.
:func:`normalised` turns a sample's advantage into per-token advantages whose *sum* over
the batch is the loss the settings ask for (``loss_normalization``).
"""

from __future__ import annotations

import hashlib
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.trainer.backend import Datum
from shared.messages import ScoredV1, TokenLogprobs

BASE_VERSION = 0
"""The version of the base model (no adapter)."""
Behaviour = Literal["processed", "unknown", "raw", "greedy"]
"""What a sample's logprobs are: ``processed``, those of the distribution each token was
drawn from (recorded as such, or raw logprobs of an untempered, untruncated sampler, which
are the same); ``unknown``, the upstream said nothing (turns recorded before the sampler
said; trusted as processed); ``raw``, the untempered model's while the sampler used a
temperature, top_p or top_k (a ratio over them would be wrong); ``greedy``, argmax
decoding (no distribution was sampled)."""
UNTRUSTED: frozenset[str] = frozenset({"raw", "greedy"})
"""Behaviours kept out of the importance-weighted losses (their fate names the reason)."""
NEUTRAL_REWARD = 0.0
"""Rewards are in [-1, 1]; the running baseline starts here."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One trainable turn, reduced to what training needs (loaded with ``Sample(**json)``:
    fields added later have defaults, so older buffered samples still load)."""

    turn_id: str
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]
    """The behaviour policy's logprob of each completion token (see ``behaviour``)."""
    reward: float
    version: int
    """Policy version that produced it (0 = base model)."""
    group: str
    """Samples of the same prompt share a group (the baseline is their mean reward)."""
    revision: int = 0
    """The reward's revision (late explicit feedback supersedes a turn's first score)."""
    behaviour: str = "unknown"
    """What ``logprobs`` are (:data:`Behaviour`); older samples are ``unknown``."""


class NotTrainable(ValueError):
    """A scored turn that cannot become a sample; the message says why (for a metric)."""


def parse_version(policy_version: str | None, adapter_name: str) -> int:
    """``<adapter_name>-v<n>`` -> n; the base model (or anything else) -> 0."""
    prefix = adapter_name + "-v"
    if policy_version and policy_version.startswith(prefix):
        digits = policy_version[len(prefix):]
        if digits.isdigit():
            return int(digits)
    return BASE_VERSION


def adapter_label(adapter_name: str, version: int) -> str:
    """The served name of an adapter version."""
    return f"{adapter_name}-v{version}"


def _param(recorded: Any, request: Mapping[str, Any], name: str) -> Any:
    """A sampling parameter as the sampler recorded it, else as the request set it."""
    value = request.get(name) if recorded is None else recorded
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def behaviour_of(sampled: TokenLogprobs, request_params: Mapping[str, Any]) -> Behaviour:
    """What a turn's logprobs are, from what the sampler recorded (``logprobs_kind`` and
    the sampling parameters; the request's parameters where the sampler recorded none).
    Greedy: marked so, temperature 0 or top_k 1. Raw logprobs equal the processed ones
    only when nothing reshaped the distribution (temperature 1, top_p 1, no top_k)."""
    temperature = _param(sampled.temperature, request_params, "temperature")
    top_p = _param(sampled.top_p, request_params, "top_p")
    top_k = _param(sampled.top_k, request_params, "top_k")
    if sampled.greedy or (temperature is not None and temperature <= 0) or top_k == 1:
        return "greedy"
    if sampled.logprobs_kind == "processed":
        return "processed"
    said = [v for v in (temperature, top_p, top_k) if v is not None]
    neutral = ((temperature is None or temperature == 1.0) and (top_p is None or top_p >= 1.0)
               and (top_k is None or top_k <= 0))
    if sampled.logprobs_kind == "raw":
        return "processed" if said and neutral else "raw"
    if not said:
        return "unknown"
    return "processed" if neutral else "raw"


def to_sample(scored: ScoredV1, adapter_name: str, *, ratio_loss: bool = True) -> Sample:
    """The sample of a scored turn; raises ``NotTrainable`` with a short reason. With
    ``ratio_loss`` (the loss weighs tokens by an importance ratio), greedy turns
    (``greedy``) and raw logprobs of a reshaped distribution (``raw_logprobs``) are
    refused: no ratio over them is right."""
    if not scored.trainable or scored.reward is None:
        raise NotTrainable("not_trainable")
    sampled = scored.turn.sampled
    if sampled is None or not sampled.token_ids or not sampled.prompt_token_ids:
        raise NotTrainable("no_tokens")
    if len(sampled.logprobs) != len(sampled.token_ids):
        raise NotTrainable("misaligned_logprobs")
    behaviour = behaviour_of(sampled, scored.turn.request_params)
    if ratio_loss and behaviour in UNTRUSTED:
        raise NotTrainable("greedy" if behaviour == "greedy" else "raw_logprobs")
    prompt = sampled.prompt_token_ids
    group = hashlib.sha256(repr(prompt).encode()).hexdigest()[:16]
    return Sample(turn_id=scored.turn.id, prompt=list(prompt),
                  completion=list(sampled.token_ids), logprobs=list(sampled.logprobs),
                  reward=float(scored.reward),
                  version=parse_version(scored.turn.policy_version, adapter_name),
                  group=group, revision=scored.revision, behaviour=behaviour)


# --- baselines ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningBaseline:
    """An adapter's reward level: an exponential moving average of the mean reward of
    each committed step (kept in Redis, so a restart keeps it)."""

    mean: float = NEUTRAL_REWARD
    steps: int = 0

    def updated(self, batch_mean: float, decay: float) -> RunningBaseline:
        """After a committed step whose rewards averaged ``batch_mean``: the first step
        sets the baseline, later ones move it by ``(1 - decay)`` of the difference."""
        if self.steps == 0:
            return RunningBaseline(batch_mean, 1)
        return RunningBaseline(decay * self.mean + (1.0 - decay) * batch_mean, self.steps + 1)

    def fields(self) -> dict[str, str]:
        """The Redis hash fields that hold it."""
        return {"mean": repr(self.mean), "steps": str(self.steps)}

    @classmethod
    def load(cls, fields: Mapping[bytes, bytes]) -> RunningBaseline:
        """From the Redis hash (empty: none yet)."""
        if b"mean" not in fields:
            return cls()
        return cls(float(fields[b"mean"]), int(fields.get(b"steps", b"0")))


def advantages(samples: list[Sample], baseline: float = NEUTRAL_REWARD, *,
               batch_normalize: bool = False) -> list[float]:
    """Per-sample advantage. A sample whose prompt has other samples in the batch: reward
    minus the group's mean, divided by the group's std when non-zero (GRPO). A sample
    alone with its prompt: reward minus ``baseline`` (the running baseline); with
    ``batch_normalize``, minus the batch's mean and divided by its std instead."""
    groups: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s.reward)
    batch = [s.reward for s in samples]
    out = []
    for s in samples:
        group = groups[s.group]
        if len(group) > 1:
            out.append(_standardised(s.reward, group))
        elif batch_normalize:
            out.append(_standardised(s.reward, batch))
        else:
            out.append(s.reward - baseline)
    return out


def _standardised(reward: float, ref: list[float]) -> float:
    """``(reward - mean) / std`` over ``ref``; only centred when the std is 0."""
    mean = statistics.fmean(ref)
    std = statistics.pstdev(ref) if len(ref) > 1 else 0.0
    return (reward - mean) / std if std > 1e-6 else reward - mean


# --- datums ------------------------------------------------------------------------------


def normalised(per_token: list[float], batch_samples: int, mode: str) -> list[float]:
    """Per-token advantages scaled so that the backends' *summed* loss is the batch's
    normalised one: ``token_mean`` divides by the answer's token count and the batch's
    sample count (each answer weighs the same), ``sequence_sum`` by the sample count only
    (each token weighs the same)."""
    if mode == "token_mean":
        scale = 1.0 / (len(per_token) * batch_samples)
    elif mode == "sequence_sum":
        scale = 1.0 / batch_samples
    else:
        raise ValueError(f"loss_normalization {mode!r} is not token_mean or sequence_sum")
    return [a * scale for a in per_token]


def to_datums(samples: list[Sample], advs: list[float],
              normalization: str = "token_mean") -> list[Datum]:
    """Datums for the samples whose advantage is not zero (they would train nothing),
    advantages :func:`normalised` over the whole batch."""
    return [Datum.from_sample(s.prompt, s.completion, s.logprobs,
                              normalised([a] * len(s.completion), len(samples), normalization))
            for s, a in zip(samples, advs, strict=True) if abs(a) > 1e-9]


def kl_shaped(advantage: float, policy: list[float], base: list[float],
              coef: float) -> list[float]:
    """Per-token advantages with a KL penalty to the base model folded in: each completion
    token's advantage is ``advantage - coef * (policy - base)``, its logprob under the
    policy being trained minus under the base model (a one-sample estimate of the
    reverse KL). Tokens the base finds likelier are pushed up, the others down, even
    when the rewards of a batch are all equal."""
    return [advantage - coef * (p - b) for p, b in zip(policy, base, strict=True)]


def is_held_out(turn_id: str, every: int) -> bool:
    """Whether a turn belongs to the gate's held-out replay (every ``every``-th turn, by
    a hash of its id, so every trainer replica and restart agrees); 0 holds none out."""
    if every <= 0:
        return False
    return int(hashlib.sha256(turn_id.encode()).hexdigest()[:8], 16) % every == 0
