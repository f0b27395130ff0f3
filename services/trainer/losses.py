"""Tinker's policy losses, per token, in torch (the local backend's half of the contract).

Every function takes 1-D tensors over the *same* selected target positions:

- ``logprobs``: the current policy's log-probabilities of the target tokens (with grad);
- ``sampler_logprobs``: the behaviour policy's (the sampler's), constants;
- ``advantages``: per-token advantages (or weights, for ``cross_entropy``), constants;

and returns per-token losses; the backend **sums** them over tokens and datums, as Tinker
does (see :mod:`services.trainer.backend`). Positions whose advantage is 0 contribute
neither loss nor gradient under any of the losses, so callers may leave them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_FNS = ("importance_sampling", "ppo", "cispo", "cross_entropy")
"""The loss functions Tinker and the local backend both implement."""
RATIO_LOSSES = frozenset({"importance_sampling", "ppo", "cispo"})
"""Losses that use the importance ratio ``exp(logprobs - sampler_logprobs)``."""
CLIPPED_LOSSES = frozenset({"ppo", "cispo"})
"""Losses that clip the ratio to ``[1 - clip, 1 + clip]``."""


class UnknownLossError(ValueError):
    """A ``loss_fn`` that is not one of :data:`LOSS_FNS`."""


def importance_ratio(logprobs: Tensor, sampler_logprobs: Tensor) -> Tensor:
    """``exp(lp - lp_old)``: how much likelier the current policy makes each token."""
    return torch.exp(logprobs - sampler_logprobs)


def importance_sampling(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor,
                        clip: float) -> Tensor:
    """``-r * A`` (``clip`` unused): the unbiased off-policy policy gradient."""
    del clip
    return -importance_ratio(logprobs, sampler_logprobs) * advantages


def ppo(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """``-min(r * A, clip(r, 1 - clip, 1 + clip) * A)``: PPO's pessimistic clipped objective."""
    ratio = importance_ratio(logprobs, sampler_logprobs)
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor,
          clip: float) -> Tensor:
    """``-stopgrad(clip(r, 1 - clip, 1 + clip)) * lp * A``: REINFORCE weighted by a clipped,
    constant ratio, so every token keeps a gradient (unlike PPO, which drops clipped ones)."""
    ratio = importance_ratio(logprobs.detach(), sampler_logprobs)
    weight = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return -weight * logprobs * advantages


def cross_entropy(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor,
                  clip: float) -> Tensor:
    """``-lp * A``: weighted negative log-likelihood (supervised; advantages are weights)."""
    del sampler_logprobs, clip
    return -logprobs * advantages


TokenLoss = Callable[[Tensor, Tensor, Tensor, float], Tensor]
_LOSSES: dict[str, TokenLoss] = {
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "cross_entropy": cross_entropy,
}


def token_loss(loss_fn: str) -> TokenLoss:
    """The per-token loss function named ``loss_fn``."""
    try:
        return _LOSSES[loss_fn]
    except KeyError:
        raise UnknownLossError(
            f"loss_fn {loss_fn!r} is not one of {', '.join(LOSS_FNS)}") from None


@dataclass(slots=True)
class LossStats:
    """Sums over trained tokens, accumulated across micro-batches and ``forward_backward``
    calls until the optimiser step reports them as means."""

    loss: float = 0.0
    tokens: int = 0
    ratio: float = 0.0
    clipped: int = 0
    approx_kl: float = 0.0

    def add(self, loss: float, logprobs: Tensor, sampler_logprobs: Tensor, clip: float) -> None:
        """Add one micro-batch (``logprobs`` detached or not; only values are read)."""
        with torch.no_grad():
            log_ratio = logprobs.detach() - sampler_logprobs
            ratio = torch.exp(log_ratio)
            self.loss += loss
            self.tokens += int(ratio.numel())
            self.ratio += float(ratio.sum())
            self.clipped += int(((ratio < 1.0 - clip) | (ratio > 1.0 + clip)).sum())
            # k3 estimator of KL(sampler || current): non-negative, low variance.
            self.approx_kl += float((ratio - 1.0 - log_ratio).sum())

    def metrics(self, loss_fn: str) -> dict[str, float]:
        """Per-step metrics: trained tokens always; ratio, KL and clip fraction where they
        mean something for ``loss_fn``."""
        out = {"tokens": float(self.tokens)}
        if loss_fn in RATIO_LOSSES and self.tokens:
            out["ratio_mean"] = self.ratio / self.tokens
            out["approx_kl"] = self.approx_kl / self.tokens
        if loss_fn in CLIPPED_LOSSES and self.tokens:
            out["clip_fraction"] = self.clipped / self.tokens
        return out
