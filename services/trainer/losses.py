"""Tinker's policy losses, per token, in torch (the local backend's half of the contract).

Every function takes 1-D tensors over the *same* selected target positions:

- ``logprobs``: the current policy's log-probabilities of the target tokens (with grad);
- ``sampler_logprobs``: the behaviour policy's (the distribution each token was drawn
  from), constants;
- ``advantages``: per-token advantages (or weights, for ``cross_entropy``), constants;

and the interval ``low, high`` the loss clips or truncates the ratio to
(:func:`services.trainer.backend.ratio_bounds`), and returns per-token losses; the backend
**sums** them over tokens and datums, as Tinker does (see :mod:`services.trainer.backend`).
Positions whose advantage is 0 contribute neither loss nor gradient under any of the
losses, so callers may leave them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from services.trainer.backend import LOSS_FNS, RATIO_LOSSES

CLIPPED_LOSSES = frozenset({"tis", "ppo", "cispo"})
"""Losses that clip or truncate the ratio (their metrics report the fraction of tokens
whose ratio fell outside the interval)."""

__all__ = ["CLIPPED_LOSSES", "LOSS_FNS", "RATIO_LOSSES", "LossStats", "UnknownLossError",
           "token_loss"]


class UnknownLossError(ValueError):
    """A ``loss_fn`` that is not one of :data:`LOSS_FNS`."""


def importance_ratio(logprobs: Tensor, sampler_logprobs: Tensor) -> Tensor:
    """``exp(lp - lp_old)``: how much likelier the current policy makes each token."""
    return torch.exp(logprobs - sampler_logprobs)


def tis(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, low: float,
        high: float) -> Tensor:
    """``-stopgrad(min(r, high)) * lp * A``: truncated importance sampling (IMPALA's
    truncated weights; Yao et al.'s TIS for sampler/trainer mismatch). Where ``r <= high``
    its gradient is the unbiased off-policy one, ``-r * grad(lp) * A``; above, the weight
    stays ``high``, so one stale or unlikely token cannot blow a step up. ``low`` unused."""
    del low
    weight = torch.clamp(importance_ratio(logprobs.detach(), sampler_logprobs), max=high)
    return -weight * logprobs * advantages


def importance_sampling(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor,
                        low: float, high: float) -> Tensor:
    """``-r * A`` (no bounds): the unbiased off-policy policy gradient, unbounded weights."""
    del low, high
    return -importance_ratio(logprobs, sampler_logprobs) * advantages


def ppo(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, low: float,
        high: float) -> Tensor:
    """``-min(r * A, clip(r, low, high) * A)``: PPO's pessimistic clipped objective."""
    ratio = importance_ratio(logprobs, sampler_logprobs)
    clipped = torch.clamp(ratio, low, high)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, low: float,
          high: float) -> Tensor:
    """``-stopgrad(clip(r, low, high)) * lp * A``: REINFORCE weighted by a clipped, constant
    ratio, so every token keeps a gradient (unlike PPO, which drops clipped ones)."""
    ratio = importance_ratio(logprobs.detach(), sampler_logprobs)
    weight = torch.clamp(ratio, low, high)
    return -weight * logprobs * advantages


def cross_entropy(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor,
                  low: float, high: float) -> Tensor:
    """``-lp * A``: weighted negative log-likelihood (supervised; advantages are weights)."""
    del sampler_logprobs, low, high
    return -logprobs * advantages


TokenLoss = Callable[[Tensor, Tensor, Tensor, float, float], Tensor]
_LOSSES: dict[str, TokenLoss] = {
    "tis": tis,
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

    def add(self, loss: float, logprobs: Tensor, sampler_logprobs: Tensor, low: float,
            high: float) -> None:
        """Add one micro-batch (``logprobs`` detached or not; only values are read)."""
        with torch.no_grad():
            log_ratio = logprobs.detach() - sampler_logprobs
            ratio = torch.exp(log_ratio)
            self.loss += loss
            self.tokens += int(ratio.numel())
            self.ratio += float(ratio.sum())
            self.clipped += int(((ratio < low) | (ratio > high)).sum())
            # k3 estimator of KL(sampler || current): non-negative, low variance.
            self.approx_kl += float((ratio - 1.0 - log_ratio).sum())

    def metrics(self, loss_fn: str) -> dict[str, float]:
        """Per-step metrics: trained tokens always; ratio, KL and clip fraction (for
        ``tis``: the fraction of tokens whose weight was truncated) where they mean
        something for ``loss_fn``."""
        out = {"tokens": float(self.tokens)}
        if loss_fn in RATIO_LOSSES and self.tokens:
            out["ratio_mean"] = self.ratio / self.tokens
            out["approx_kl"] = self.approx_kl / self.tokens
        if loss_fn in CLIPPED_LOSSES and self.tokens:
            out["clip_fraction"] = self.clipped / self.tokens
        return out
