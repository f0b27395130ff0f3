"""The whole loop learns: a scripted user's implicit feedback trains the served model.

Redis, the policy server (embedded SmolLM2-135M), the gateway, the scorer and the trainer
run as processes (``services/stack``). The scripted user prefers answers of at most 12
words that contain the right keyword, and says so in its next message ("Thanks,
perfect!" or "No, that's wrong: too long ..."): the real scorer turns that into the
reward, no judge involved. The held-out questions are never trained on.

Before: the base model on the held-out questions. Then the user talks through the
gateway until the trainer has committed :data:`STEPS` steps and the gateway serves the
last adapter. After: the same held-out questions with the same seeds. The mean reward
must rise by :data:`MARGIN`, and the recorded turns must show the policy version move
from ``base`` to ``reef-v<n>``.

The test can fail: ``REEF_E2E_LEARNING_RATE=0`` (steps and swaps happen, the weights do
not change) fails on the margin; ``REEF_E2E_MODE=skills_only`` (no steps) fails on the
version. Takes ~7-9 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

import pytest
import redis

from services.stack.drive import LoopDriver
from services.stack.launch import share_models, start_stack
from services.stack.procs import Stack
from services.stack.scripted import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    Evaluation,
    Preference,
    ScriptedUser,
)
from shared.keys import TURNS, Keys
from shared.messages import TurnV1, decode
from shared.settings import Settings
from tests.conftest import RedisServer
from tests.test_policy import policy_data_dir

pytestmark = pytest.mark.slow
_FIXTURES = (policy_data_dir,)

STEPS = 12
"""Trainer steps (each one batch of 16 conversations) before measuring again."""
MARGIN = 0.25
"""Minimum rise of the held-out mean reward (rewards are +1 / -1)."""
EVAL_SAMPLES = 3
"""Seeded samples per held-out question, before and after (8 questions)."""
TEMPERATURE = 0.7
"""Sampling temperature of every answer (at 1.0 this small model rambles off topic)."""
LEARNING_RATE = os.environ.get("REEF_E2E_LEARNING_RATE", "1e-3")
MODE = os.environ.get("REEF_E2E_MODE", "rl")


def recorded_turns(redis_url: str, namespace: str) -> list[TurnV1]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                       client.xrange(Keys(namespace).stream(TURNS)))
    finally:
        client.close()
    return [t for t in (decode(f) for _, f in entries) if isinstance(t, TurnV1)]


def report(label: str, evaluation: Evaluation) -> None:
    print(f"\n{label}: {evaluation.summary()}")
    for outcome in evaluation.outcomes[::EVAL_SAMPLES]:
        print(f"  {outcome.verdict.reward:+.0f} {outcome.answer[:90]!r}")


async def test_scripted_feedback_raises_held_out_reward(
        redis_server: RedisServer, namespace: str, policy_data_dir: Path,
        tmp_path: Path) -> None:
    started = time.monotonic()
    data_dir = tmp_path / "data"
    share_models(policy_data_dir, data_dir)
    settings = Settings(profile="dev", data_dir=data_dir, namespace=namespace,
                        redis_url=redis_server.url)
    # The gate is tested on its own; here it would hold a fifth of the turns back and
    # could keep a step's adapter from going live.
    env = {"REEF_LEARNING_RATE": LEARNING_RATE, "REEF_MODE": MODE,
           "REEF_MAX_STEPS": str(STEPS), "REEF_GATE_ENABLED": "false"}
    stack = Stack(data_dir)
    try:
        info = start_stack(settings, stack, learning=True, env=env)
        user = ScriptedUser(info.gateway_url, info.api_key, info.model,
                            preference=Preference(max_words=12), max_tokens=32,
                            temperature=TEMPERATURE)
        driver = LoopDriver(info, user, adapter=settings.adapter_name)
        try:
            before = await user.evaluate(HELDOUT_PROMPTS, EVAL_SAMPLES, tag="before",
                                         temperature=TEMPERATURE)
            report("before", before)
            log = await driver.train(TRAIN_PROMPTS, steps=STEPS, max_rounds=3 * STEPS,
                                     round_timeout=240)
            for i, outcomes in enumerate(log.rounds):
                mean = sum(o.verdict.reward for o in outcomes) / len(outcomes)
                print(f"round {i}: mean reward {mean:+.2f} ({outcomes[0].version})")
            assert log.committed >= STEPS, f"only {log.committed} steps were committed"
            live = await driver.wait_live(STEPS, timeout=120)
            after = await user.evaluate(HELDOUT_PROMPTS, EVAL_SAMPLES, tag="after",
                                        temperature=TEMPERATURE)
            report("after", after)
        finally:
            driver.close()
            await user.close()
    finally:
        stack.close()
    print(f"\n{STEPS} steps, {log.seconds:.0f}s of training; whole test "
          f"{time.monotonic() - started:.0f}s")

    assert set(before.versions) == {info.model}
    assert set(after.versions) == {live} == {f"{settings.adapter_name}-v{STEPS}"}
    turns = recorded_turns(info.redis_url, namespace)
    trained = [t.policy_version for t in turns if t.session_id.startswith("train-")]
    assert trained[0] == "base"
    assert any(v and v.startswith(f"{settings.adapter_name}-v") for v in trained)
    heldout = [t.policy_version for t in turns if t.session_id.startswith("after-")]
    assert heldout and set(heldout) == {live}
    assert after.mean_reward >= before.mean_reward + MARGIN, (
        f"held-out mean reward {before.mean_reward:+.3f} -> {after.mean_reward:+.3f}")
