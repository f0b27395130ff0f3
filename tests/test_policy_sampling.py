"""Processed logprobs, checked against numbers computed by hand (no model, no I/O).

The logits are ``ln [0.5, 0.25, 0.15, 0.1]``: at temperature 1 the probabilities are those
numbers exactly, so every expected value below is a fraction of them.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from services.policy.sampling import (
    EXCLUDED_LOGPROB,
    SamplingParams,
    processed_logprobs,
    sample,
)

P = [0.5, 0.25, 0.15, 0.1]
LOGITS = torch.tensor([math.log(p) for p in P])
NONE = float("-inf")


def expected(*probs: float) -> list[float]:
    return [math.log(p) if p > 0 else NONE for p in probs]


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "probs"), [
    (1.0, 0, 1.0, P),  # no processing: the model's own distribution
    (1.0, 2, 1.0, (2 / 3, 1 / 3, 0, 0)),  # top 2 of 0.75, renormalised
    (1.0, 0, 0.7, (2 / 3, 1 / 3, 0, 0)),  # mass before the 3rd token is 0.75 >= 0.7
    (1.0, 0, 0.8, (0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0)),  # 0.75 < 0.8 keeps the 3rd
    # T=0.5 squares the probabilities: [.25, .0625, .0225, .01] / .345
    (0.5, 0, 1.0, (0.25 / 0.345, 0.0625 / 0.345, 0.0225 / 0.345, 0.01 / 0.345)),
    # ... then top_p 0.9 keeps the first two (0.7246 before the 3rd < 0.9 <= 0.9058): 0.8/0.2
    (0.5, 0, 0.9, (0.8, 0.2, 0, 0)),
    # T=2 takes square roots; top_k 3 drops the last and renormalises over the rest
    (2.0, 3, 1.0, (math.sqrt(0.5) / (s := math.sqrt(0.5) + 0.5 + math.sqrt(0.15)),
                   0.5 / s, math.sqrt(0.15) / s, 0)),
    # top_k, then top_p (vLLM's order): top 2 is [2/3, 1/3], and 2/3 already reaches 0.6
    (1.0, 2, 0.6, (1.0, 0, 0, 0)),
    (1.0, -1, 1.0, P),  # -1 (vLLM's and Tinker's "no cut") is no cut
])
def test_processed_logprobs_match_hand_computed_values(
        temperature: float, top_k: int, top_p: float, probs: tuple[float, ...]) -> None:
    got = processed_logprobs(LOGITS, temperature, top_k, top_p).tolist()
    assert got == pytest.approx(expected(*probs), abs=1e-6)


def test_sampled_tokens_carry_the_processed_logprob_of_what_was_drawn() -> None:
    params = SamplingParams(1, temperature=0.5, top_p=0.9, seed=1, top_logprobs=3)
    generator = torch.Generator().manual_seed(0)
    drawn = [sample(LOGITS, params, generator) for _ in range(2000)]
    counts = Counter(t.token_id for t in drawn)
    assert set(counts) == {0, 1}  # the cut tokens are never drawn
    assert counts[1] / len(drawn) == pytest.approx(0.2, abs=0.03)
    for token in drawn[:50]:
        assert token.logprob == pytest.approx(math.log(0.8 if token.token_id == 0 else 0.2))
        # Alternatives from the same distribution; a cut token is -9999 (JSON has no -inf).
        assert [t for t, _ in token.top] == [0, 1, 2]
        assert [v for _, v in token.top] == pytest.approx(
            [math.log(0.8), math.log(0.2), EXCLUDED_LOGPROB])
    assert params.logprobs_kind == "processed" and not params.greedy


def test_greedy_is_a_point_mass_and_raw_mode_reports_the_model() -> None:
    generator = torch.Generator().manual_seed(0)
    greedy = SamplingParams(1, temperature=0.0, top_logprobs=2)
    token = sample(LOGITS, greedy, generator)
    assert (token.token_id, token.logprob) == (0, 0.0)
    assert token.top == ((0, 0.0), (1, EXCLUDED_LOGPROB))
    assert greedy.greedy and SamplingParams(1, top_k=1).greedy
    raw_greedy = SamplingParams(1, temperature=0.0, logprobs_mode="raw_logprobs")
    assert sample(LOGITS, raw_greedy, generator).logprob == pytest.approx(math.log(0.5))
    raw = SamplingParams(1, temperature=0.5, top_k=2, logprobs_mode="raw_logprobs")
    assert raw.logprobs_kind == "raw"
    for _ in range(20):
        drawn = sample(LOGITS, raw, generator)
        assert drawn.token_id in (0, 1)  # sampled with the cut ...
        assert drawn.logprob == pytest.approx(math.log(P[drawn.token_id]))  # ... reported raw


def test_the_same_seed_draws_the_same_tokens() -> None:
    params = SamplingParams(1, temperature=0.8, top_p=0.95, top_k=3)

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample(LOGITS, params, generator).token_id for _ in range(30)]

    assert draws(7) == draws(7)
