"""From scored turns to training datums: exact sampled tokens, group-baseline advantages.

A sample is trained on the token ids the policy actually sampled and the logprobs the
sampler reported for them, never a re-tokenization of the text. Advantages are the reward
minus the mean reward of the sample's group: samples answering the same prompt form a
group; samples whose group has a single member fall back to the batch mean. Advantages
are divided by the group's reward std when it is non-zero (GRPO-style), so one group's
scale does not drown another's.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import defaultdict
from dataclasses import dataclass

from services.trainer.backend import Datum
from shared.messages import ScoredV1

BASE_VERSION = 0
"""The version of the base model (no adapter)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One trainable turn, reduced to what training needs."""

    turn_id: str
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]
    reward: float
    version: int
    """Policy version that produced it (0 = base model)."""
    group: str
    """Samples of the same prompt share a group (the baseline is their mean reward)."""
    revision: int = 0
    """The reward's revision (late explicit feedback supersedes a turn's first score)."""


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


def to_sample(scored: ScoredV1, adapter_name: str) -> Sample:
    """The sample of a scored turn; raises ``NotTrainable`` with a short reason."""
    if not scored.trainable or scored.reward is None:
        raise NotTrainable("not_trainable")
    sampled = scored.turn.sampled
    if sampled is None or not sampled.token_ids or not sampled.prompt_token_ids:
        raise NotTrainable("no_tokens")
    if len(sampled.logprobs) != len(sampled.token_ids):
        raise NotTrainable("misaligned_logprobs")
    prompt = sampled.prompt_token_ids
    group = hashlib.sha256(repr(prompt).encode()).hexdigest()[:16]
    return Sample(turn_id=scored.turn.id, prompt=list(prompt),
                  completion=list(sampled.token_ids), logprobs=list(sampled.logprobs),
                  reward=float(scored.reward),
                  version=parse_version(scored.turn.policy_version, adapter_name),
                  group=group, revision=scored.revision)


def advantages(samples: list[Sample]) -> list[float]:
    """Per-sample advantage: reward minus its group's mean (batch mean for singletons),
    divided by that reference set's std when non-zero."""
    groups: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s.reward)
    batch = [s.reward for s in samples]
    out = []
    for s in samples:
        ref = groups[s.group] if len(groups[s.group]) > 1 else batch
        mean = statistics.fmean(ref)
        std = statistics.pstdev(ref) if len(ref) > 1 else 0.0
        out.append((s.reward - mean) / std if std > 1e-6 else s.reward - mean)
    return out


def to_datums(samples: list[Sample], advs: list[float]) -> list[Datum]:
    """Datums for the samples whose advantage is not zero (they would train nothing)."""
    return [Datum.from_sample(s.prompt, s.completion, s.logprobs, a)
            for s, a in zip(samples, advs, strict=True) if abs(a) > 1e-9]


def kl_shaped(advantage: float, sampled: list[float], base: list[float],
              coef: float) -> list[float]:
    """Per-token advantages with a KL penalty to the base model folded in: each completion
    token's advantage is ``advantage - coef * (sampled - base)``, its logprob under the
    policy that sampled it minus under the base model (a one-sample estimate of the
    reverse KL). Tokens the base finds likelier are pushed up, the others down, even
    when the rewards of a batch are all equal."""
    return [advantage - coef * (s - b) for s, b in zip(sampled, base, strict=True)]


def is_held_out(turn_id: str, every: int) -> bool:
    """Whether a turn belongs to the gate's held-out replay (every ``every``-th turn, by
    a hash of its id, so every trainer replica and restart agrees); 0 holds none out."""
    if every <= 0:
        return False
    return int(hashlib.sha256(turn_id.encode()).hexdigest()[:8], 16) % every == 0
