"""Unit tests: scored turns to samples, group-baseline advantages, datums."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest

from services.trainer.backend import Datum
from services.trainer.samples import (
    NotTrainable,
    RunningBaseline,
    Sample,
    advantages,
    normalised,
    parse_version,
    to_datums,
    to_sample,
)
from shared.messages import ScoredV1, TokenLogprobs, TurnV1
from shared.settings import Settings


def scored(reward: float | None = 1.0, prompt: list[int] | None = None,
           version: str | None = "reef-v3", trainable: bool = True,
           request: dict[str, Any] | None = None, **sampling: Any) -> ScoredV1:
    """A scored turn; ``sampling``: what the sampler recorded (logprobs_kind, temperature,
    top_p, top_k); ``request``: the request's parameters."""
    turn = TurnV1(id="t1", tenant="t", session_id="s", request_model="m", upstream_model="m",
                  messages=[{"role": "user", "content": "hi"}],
                  response_message={"role": "assistant", "content": "yo"},
                  policy_version=version, request_params=request or {},
                  sampled=TokenLogprobs(token_ids=[7, 8, 2], logprobs=[-0.1, -0.2, -0.3],
                                        prompt_token_ids=prompt or [1, 2, 3], **sampling))
    return ScoredV1(turn=turn, reward=reward, trainable=trainable)


def sample(reward: float, group: str, turn_id: str = "x") -> Sample:
    return Sample(turn_id=turn_id, prompt=[1, 2], completion=[3], logprobs=[-1.0],
                  reward=reward, version=0, group=group)


def test_sample_keeps_the_sampled_tokens_and_version() -> None:
    s = to_sample(scored(), "reef")
    assert (s.prompt, s.completion, s.logprobs) == ([1, 2, 3], [7, 8, 2], [-0.1, -0.2, -0.3])
    assert s.version == 3 and s.reward == 1.0
    assert to_sample(scored(prompt=[1, 2, 3]), "reef").group == s.group
    assert to_sample(scored(prompt=[1, 2, 4]), "reef").group != s.group
    assert parse_version("base", "reef") == 0 and parse_version("reef-vx", "reef") == 0


@pytest.mark.parametrize("bad", [scored(reward=None), scored(trainable=False)])
def test_untrainable_turns_are_refused_with_a_reason(bad: ScoredV1) -> None:
    with pytest.raises(NotTrainable, match="not_trainable"):
        to_sample(bad, "reef")


def test_groups_use_their_mean_and_std_and_singletons_the_running_baseline() -> None:
    batch = [sample(1.0, "a"), sample(0.0, "a"), sample(0.5, "a"), sample(0.8, "b"),
             sample(-0.4, "c")]
    advs = advantages(batch, baseline=0.3)
    # group a: mean 0.5, population std sqrt((0.25 + 0.25 + 0) / 3) = 0.408248
    assert advs[:3] == pytest.approx([1.224745, -1.224745, 0.0], abs=1e-6)
    # b and c are alone with their prompts: reward minus the running baseline 0.3
    assert advs[3:] == pytest.approx([0.5, -0.7])


def test_organic_traffic_is_not_normalised_across_unrelated_prompts() -> None:
    """Defect: every prompt different -> the batch's mean divided by its std was the
    baseline, so one sample's advantage moved with unrelated prompts' rewards."""
    organic = [sample(1.0, "p1"), sample(0.5, "p2"), sample(0.5, "p3"), sample(0.0, "p4")]
    assert advantages(organic, baseline=0.25) == pytest.approx([0.75, 0.25, 0.25, -0.25])
    other = [sample(1.0, "p1"), sample(-1.0, "p5")]
    assert advantages(other, baseline=0.25)[0] == advantages(organic, baseline=0.25)[0]


def test_batch_normalisation_across_prompts_is_an_explicit_flag() -> None:
    batch = [sample(1.0, "a"), sample(0.0, "a"), sample(0.5, "a"), sample(0.8, "b"),
             sample(-0.4, "c")]
    advs = advantages(batch, baseline=0.3, batch_normalize=True)
    assert advs[:3] == pytest.approx([1.224745, -1.224745, 0.0], abs=1e-6)  # groups as before
    # singletons: batch mean 1.9 / 5 = 0.38, population std sqrt(1.328 / 5) = 0.515364
    assert advs[3:] == pytest.approx([0.42 / 0.515364, -0.78 / 0.515364], abs=1e-5)


def test_running_baseline_is_an_ema_of_step_means_and_round_trips() -> None:
    b = RunningBaseline()
    assert (b.mean, b.steps) == (0.0, 0)  # the neutral reward before any step
    b = b.updated(0.5, 0.9)
    assert (b.mean, b.steps) == (0.5, 1)  # the first step sets it
    b = b.updated(1.0, 0.9)
    assert b.mean == pytest.approx(0.9 * 0.5 + 0.1 * 1.0) and b.steps == 2  # 0.55
    b = b.updated(-1.0, 0.9)
    assert b.mean == pytest.approx(0.395) and b.steps == 3
    stored = {k.encode(): v.encode() for k, v in b.fields().items()}
    assert RunningBaseline.load(stored) == b and RunningBaseline.load({}) == RunningBaseline()


def test_identical_rewards_in_a_group_or_at_the_baseline_give_no_datums() -> None:
    batch = [sample(1.0, "a"), sample(1.0, "a"), sample(1.0, "b")]
    assert to_datums(batch, advantages(batch, baseline=1.0)) == []


def long_and_short(adv_long: float, adv_short: float) -> tuple[list[Sample], list[float]]:
    samples = [Sample(turn_id="l", prompt=[1], completion=[5] * 8, logprobs=[-1.0] * 8,
                      reward=1.0, version=0, group="l"),
               Sample(turn_id="s", prompt=[1], completion=[6, 7], logprobs=[-1.0] * 2,
                      reward=1.0, version=0, group="s")]
    return samples, [adv_long, adv_short]


def test_token_mean_weighs_each_answer_once_whatever_its_length() -> None:
    """Defect: the loss was summed over tokens, so an 8-token answer weighed 4x a 2-token
    one with the same advantage."""
    samples, advs = long_and_short(1.0, 1.0)
    long, short = to_datums(samples, advs)
    # each answer's advantage / (its tokens x 2 samples): 1/16 per token, 1/4 per token
    assert long.advantages == [1 / 16] * 8 and short.advantages == [0.25, 0.25]
    assert sum(long.advantages) == sum(short.advantages) == pytest.approx(0.5)


def test_sequence_sum_weighs_each_token_once() -> None:
    samples, advs = long_and_short(1.0, -2.0)
    long, short = to_datums(samples, advs, "sequence_sum")
    assert long.advantages == [0.5] * 8 and short.advantages == [-1.0, -1.0]


def test_normalised_scales_per_token_advantages_by_hand() -> None:
    assert normalised([2.0, -1.0, 3.0, 0.0], 2, "token_mean") == [0.25, -0.125, 0.375, 0.0]
    assert normalised([2.0, -1.0, 3.0, 0.0], 2, "sequence_sum") == [1.0, -0.5, 1.5, 0.0]
    with pytest.raises(ValueError, match="loss_normalization"):
        normalised([1.0], 1, "sum")


def test_datum_layout_matches_tinker_conventions() -> None:
    d = Datum.from_sample([1, 2, 3], [7, 8], [-0.5, -0.25], 2.0)
    assert d.tokens == [1, 2, 3, 7, 8]
    # targets are tokens[1:] = [2, 3, 7, 8]: prompt targets get 0, completion targets the inputs
    assert d.logprobs == [0.0, 0.0, -0.5, -0.25] and d.advantages == [0.0, 0.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="logprobs"):
        Datum.from_sample([1], [2, 3], [-0.1], 1.0)


# --- behaviour logprobs -----------------------------------------------------------------------


def test_processed_logprobs_are_the_ratio_s_denominator_as_recorded() -> None:
    s = to_sample(scored(logprobs_kind="processed", temperature=0.8, top_p=0.95), "reef")
    assert s.behaviour == "processed" and s.logprobs == [-0.1, -0.2, -0.3]
    datum = to_datums([s], [1.0])[0]
    assert datum.logprobs == [0.0, 0.0, -0.1, -0.2, -0.3]  # what exp(lp - lp_old) divides by


@pytest.mark.parametrize(("sampling", "request_params"), [
    ({"logprobs_kind": "raw", "temperature": 0.8}, {}),
    ({"logprobs_kind": "raw", "temperature": 1.0, "top_p": 0.95}, {}),
    ({"logprobs_kind": "raw", "temperature": 1.0, "top_k": 40}, {}),
    ({"logprobs_kind": "raw"}, {}),  # raw, and nothing says the sampler was neutral
    ({}, {"temperature": 0.7, "top_p": 1.0}),  # today's policy server: raw, unsaid
])
def test_raw_logprobs_of_a_reshaped_distribution_are_kept_out_of_ratio_losses(
        sampling: dict[str, Any], request_params: dict[str, Any]) -> None:
    """Defect: the sampler's raw logprobs divided the ratio while it sampled at the
    request's temperature / top_p, so every ratio was wrong."""
    turn = scored(request=request_params, **sampling)
    with pytest.raises(NotTrainable, match="raw_logprobs"):
        to_sample(turn, "reef")
    assert to_sample(turn, "reef", ratio_loss=False).behaviour == "raw"


@pytest.mark.parametrize(("sampling", "request_params", "behaviour"), [
    ({"logprobs_kind": "raw", "temperature": 1.0, "top_p": 1.0, "top_k": -1}, {}, "processed"),
    ({"logprobs_kind": "raw"}, {"temperature": 1, "top_p": 1}, "processed"),
    ({}, {"temperature": 1.0}, "processed"),
    ({"logprobs_kind": "processed", "temperature": 0.5, "top_k": 20}, {}, "processed"),
    ({}, {}, "unknown"),  # turns recorded before the sampler said: trusted as today
    ({}, {"temperature": "hot"}, "unknown"),  # nonsense is not a recorded parameter
])
def test_logprobs_of_the_sampled_distribution_are_trusted(
        sampling: dict[str, Any], request_params: dict[str, Any], behaviour: str) -> None:
    assert to_sample(scored(request=request_params, **sampling), "reef").behaviour == behaviour


@pytest.mark.parametrize(("sampling", "request_params"), [
    ({"logprobs_kind": "processed", "temperature": 0.0}, {}),
    ({"logprobs_kind": "raw", "temperature": 0.0}, {"temperature": 0.7}),  # sampler wins
    ({}, {"temperature": 0}),
    ({"temperature": 0.9, "top_k": 1}, {}),
    ({"logprobs_kind": "processed", "greedy": True}, {"temperature": 0.7}),
])
def test_greedy_turns_are_kept_out_of_ratio_losses(
        sampling: dict[str, Any], request_params: dict[str, Any]) -> None:
    """Defect: greedy turns were trained as if sampled (their "behaviour" is no
    distribution, so no ratio over it means anything)."""
    turn = scored(request=request_params, **sampling)
    with pytest.raises(NotTrainable, match="greedy"):
        to_sample(turn, "reef")
    assert to_sample(turn, "reef", ratio_loss=False).behaviour == "greedy"  # cross_entropy


def test_older_buffered_samples_still_load() -> None:
    old: dict[str, Any] = {"turn_id": "t", "prompt": [1, 2], "completion": [3],
                           "logprobs": [-1.0], "reward": 0.5, "version": 2, "group": "g"}
    s = Sample(**old)
    assert (s.revision, s.behaviour) == (0, "unknown")
    assert Sample(**asdict(s)) == s


def test_the_default_objective_truncates_clips_and_averages() -> None:
    """Defect: the default was unclipped importance sampling, no gradient clipping, a sum
    over tokens, and a cross-prompt batch normalisation."""
    s = Settings(profile="dev")
    assert (s.loss_fn, s.tis_cap, s.max_grad_norm) == ("tis", 2.0, 1.0)
    assert (s.loss_normalization, s.advantage_batch_normalize) == ("token_mean", False)
    assert s.baseline_decay == 0.9
