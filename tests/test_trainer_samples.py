"""Unit tests: scored turns to samples, group-baseline advantages, datums."""

from __future__ import annotations

import pytest

from services.trainer.backend import Datum
from services.trainer.samples import (
    NotTrainable,
    Sample,
    advantages,
    parse_version,
    to_datums,
    to_sample,
)
from shared.messages import ScoredV1, TokenLogprobs, TurnV1


def scored(reward: float | None = 1.0, prompt: list[int] | None = None,
           version: str | None = "reef-v3", trainable: bool = True) -> ScoredV1:
    turn = TurnV1(id="t1", tenant="t", session_id="s", request_model="m", upstream_model="m",
                  messages=[{"role": "user", "content": "hi"}],
                  response_message={"role": "assistant", "content": "yo"},
                  policy_version=version,
                  sampled=TokenLogprobs(token_ids=[7, 8, 2], logprobs=[-0.1, -0.2, -0.3],
                                        prompt_token_ids=prompt or [1, 2, 3]))
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


def test_advantages_use_the_group_baseline_then_the_batch() -> None:
    batch = [sample(1.0, "a"), sample(-1.0, "a"), sample(1.0, "b"), sample(0.0, "c")]
    advs = advantages(batch)
    assert advs[0] == pytest.approx(1.0) and advs[1] == pytest.approx(-1.0)  # (r-0)/1
    # b and c are singletons: batch mean 0.25, batch std ~0.83
    assert advs[2] > 0 > advs[3]


def test_identical_rewards_give_no_datums() -> None:
    batch = [sample(1.0, "a"), sample(1.0, "a"), sample(1.0, "b")]
    assert to_datums(batch, advantages(batch)) == []


def test_datum_layout_matches_tinker_conventions() -> None:
    d = Datum.from_sample([1, 2, 3], [7, 8], [-0.5, -0.25], 2.0)
    assert d.tokens == [1, 2, 3, 7, 8]
    # targets are tokens[1:] = [2, 3, 7, 8]: prompt targets get 0, completion targets the inputs
    assert d.logprobs == [0.0, 0.0, -0.5, -0.25] and d.advantages == [0.0, 0.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="logprobs"):
        Datum.from_sample([1], [2, 3], [-0.1], 1.0)
