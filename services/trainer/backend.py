"""The one interface both training backends (local, Tinker) implement.

Conventions follow Tinker's, so both backends train on the same data the same way:

- A datum is one sequence ``prompt + completion`` of token ids, exactly as sampled (never
  re-tokenized). Its model input is ``seq[:-1]`` and its targets ``seq[1:]``.
- ``logprobs`` (the sampler's, i.e. the behaviour policy's) and ``advantages`` are given per
  *target* position, 0 on prompt positions: there is no separate mask.
- Losses are **summed** over tokens and datums (not averaged); how a batch is averaged
  (per answer, or per token) is decided by the trainer, which scales the advantages
  (:func:`services.trainer.samples.normalised`), so that both backends agree:
  - ``tis``: ``-sum(stopgrad(min(r, cap)) * lp * A)``, truncated importance sampling, with
    ``r = exp(lp - lp_old)`` (on Tinker: its ``cispo`` with the thresholds ``[0, cap]``)
  - ``importance_sampling``: ``-sum(r * A)`` (unbounded weights)
  - ``ppo``: ``-sum(min(r * A, clip(r, 1 - eps, 1 + eps) * A))``
  - ``cispo``: ``-sum(stopgrad(clip(r, 1 - eps, 1 + eps)) * lp * A)``
  - ``cross_entropy``: ``-sum(lp * A)`` (advantages act as per-token weights)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

LOSS_FNS = ("tis", "importance_sampling", "ppo", "cispo", "cross_entropy")
"""The loss functions both backends implement (``loss_fn``)."""
RATIO_LOSSES = frozenset({"tis", "importance_sampling", "ppo", "cispo"})
"""Losses weighted by the importance ratio ``exp(lp - lp_old)``: they need the logprobs of
the distribution each token was drawn from (greedy turns have none)."""


def ratio_bounds(loss_fn: str, ppo_clip: float, tis_cap: float) -> tuple[float, float] | None:
    """The interval a loss clips (``ppo``, ``cispo``: ``[1 - ppo_clip, 1 + ppo_clip]``) or
    truncates (``tis``: ``[0, tis_cap]``) the ratio to; None for the others."""
    if loss_fn in ("ppo", "cispo"):
        return 1.0 - ppo_clip, 1.0 + ppo_clip
    if loss_fn == "tis":
        return 0.0, tis_cap
    return None


class StepError(RuntimeError):
    """A failed call of a training step to something outside the trainer (the Tinker
    service, the teacher). ``transient`` ones (network, timeouts, server errors, rate
    limits) are retried in place; others count as failures of the batch."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True, slots=True)
class Datum:
    """One training sequence with per-target-position inputs (length ``len(tokens) - 1``)."""

    tokens: list[int]
    """Prompt then completion token ids, as sampled."""
    logprobs: list[float]
    """Sampler logprobs per target position (0 on prompt positions)."""
    advantages: list[float]
    """Advantage per target position (0 on prompt positions)."""

    @classmethod
    def from_sample(cls, prompt: list[int], completion: list[int],
                    completion_logprobs: list[float], advantage: float | list[float]) -> Datum:
        """A datum from a sampled completion; ``advantage`` is one value for every
        completion token, or one per completion token."""
        if len(completion) != len(completion_logprobs):
            raise ValueError(f"{len(completion)} completion tokens but "
                             f"{len(completion_logprobs)} logprobs")
        if not prompt or not completion:
            raise ValueError("a datum needs a prompt and a completion")
        per_token = ([advantage] * len(completion) if isinstance(advantage, int | float)
                     else list(advantage))
        if len(per_token) != len(completion):
            raise ValueError("one advantage per completion token is required")
        pad = [0.0] * (len(prompt) - 1)
        return cls(tokens=[*prompt, *completion],
                   logprobs=[*pad, *completion_logprobs],
                   advantages=[*pad, *per_token])

    def __post_init__(self) -> None:
        n = len(self.tokens) - 1
        if n < 1 or len(self.logprobs) != n or len(self.advantages) != n:
            raise ValueError(f"datum of {len(self.tokens)} tokens needs {n} logprobs and "
                             f"advantages, got {len(self.logprobs)} and {len(self.advantages)}")


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one optimisation step did, read back from the backend (never assumed)."""

    step: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A saved training state (weights + optimizer) and the adapter to serve from it."""

    step: int
    state_path: str
    """Where the full state is (a directory, or a ``tinker://`` path)."""
    adapter_path: str
    """What the policy server loads (a PEFT adapter directory, or a Tinker sampler path)."""


class TrainingBackend(Protocol):
    """A LoRA training client. Methods may block: the trainer calls them off its event
    loop (``asyncio.to_thread``)."""

    def start(self) -> Checkpoint | None:
        """Create the LoRA training client, resuming from the latest checkpoint if there
        is one (returned)."""

    def restore(self, checkpoint: Checkpoint) -> None:
        """Go back to a saved state (weights, optimizer state and step counter); gradients
        accumulated since the last step are dropped. The trainer calls it after a refused
        candidate, a failed step and a rollback, so that training goes on from the live
        version."""

    def delete(self, checkpoint: Checkpoint) -> None:
        """Delete a saved checkpoint (its state and its adapter); one already gone is fine."""

    def pin(self, checkpoint: Checkpoint) -> None:
        """Keep a checkpoint until :meth:`delete` (lift any expiry it was saved with)."""

    def close(self) -> None:
        """Release the training client (the trainer calls it on shutdown)."""

    def forward_backward(self, datums: list[Datum], loss_fn: str) -> float:
        """Accumulate gradients of the summed loss; returns the loss value."""

    def optim_step(self, learning_rate: float) -> StepResult:
        """Apply the accumulated gradients (AdamW) and advance the step counter."""

    def save(self, name: str) -> Checkpoint:
        """Save weights and optimizer state, and an adapter the policy server can load."""

    def logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """Current-policy logprobs per target position (for evaluation and KL)."""

    def base_logprobs(self, datums: list[Datum]) -> list[list[float]]:
        """The base model's (no adapter) logprobs per target position: the reference of
        the RL mode's KL penalty (``kl_base_coef``)."""
