"""``make demo``: the whole loop on this machine, and a report in which the agent improves.

Every service runs as a local process (``services/stack/launch.py``): Redis (a private one
when none answers), the embedded policy model, the gateway with skill injection, the
scorer, the skill-miner (offline: it turns the user's corrections into skills, no API key)
and the local LoRA trainer. A scripted user (``services/stack/scripted.py``) wants answers
of at most 12 words that still answer the question, and says so after every answer:
"Thanks, perfect!" or "No, that's wrong: too long. Answer in at most 12 words."

What happens, in the order a user sees it:

1. *Before*: the base model answers the held-out questions (never trained on).
2. *Skills*: the first corrections reach the skill-miner, which writes the user's
   instruction down as a preference skill; from the next round on, the gateway injects it
   into every prompt. Behaviour changes with no training at all.
3. *Weights*: every 16 conversations the trainer takes a LoRA RL step on the rewards the
   scorer derived from the user's replies, and the gateway swaps each new adapter in
   while it keeps answering.
4. *After*: the held-out questions again, same seeds. The report (table, PNG plot, JSON)
   goes to ``var/demo/<time>/``.

The exit status is 0 when the held-out mean reward rose, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import cast

import redis
import redis.asyncio as aioredis

from services.stack.drive import LoopDriver, LoopStalled, TrainingLog, metric_sum
from services.stack.launch import LOCAL_TENANT, StackInfo, share_models, start_stack
from services.stack.procs import Stack, StackError
from services.stack.report import HEADER, RoundRow, format_row, plot, round_row
from services.stack.scripted import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    Evaluation,
    Outcome,
    Preference,
    ScriptedUser,
)
from shared.keys import TURNS, Keys, adapter_for
from shared.messages import TurnV1, decode
from shared.settings import Settings
from shared.skill_store import SkillStore
from shared.skills import Skill

STEPS = 10
"""Trainer steps (16 conversations each). ~40-60 s per round on 2 CPU cores."""
MAX_WORDS = 12
EVAL_SAMPLES = 4
"""Seeded answers per held-out question (8 questions), before and after."""
TEMPERATURE = 0.7
MAX_TOKENS = 32
RECENT_TURNS = 400
"""How far back in the ``turns`` stream a round's turns are looked up."""


def injected_share(client: redis.Redis, namespace: str, prefix: str) -> float:
    """Share of the first turns of sessions named ``prefix...`` that had skills injected."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(
        Keys(namespace).stream(TURNS), count=RECENT_TURNS))
    firsts = [t for t in (decode(f) for _, f in entries) if isinstance(t, TurnV1)
              and t.session_id.startswith(prefix) and t.turn_index == 0]
    return statistics.fmean(1.0 if t.skill_ids else 0.0 for t in firsts) if firsts else 0.0


async def tenant_skills(info: StackInfo) -> list[Skill]:
    client = aioredis.Redis.from_url(info.redis_url)
    try:
        store = SkillStore(client, Keys(info.namespace), maxlen=10_000)
        return [s for tenant in await store.tenants() for s in await store.list(tenant)]
    finally:
        await client.aclose()


class Demo:
    """One run: the stack, the scripted user, and what they produce."""

    def __init__(self, info: StackInfo, adapter: str, out_dir: Path, steps: int) -> None:
        self.info = info
        self.out_dir = out_dir
        self.steps = steps
        self.user = ScriptedUser(info.gateway_url, info.api_key, info.model,
                                 preference=Preference(MAX_WORDS), max_tokens=MAX_TOKENS,
                                 temperature=TEMPERATURE)
        self.driver = LoopDriver(info, self.user, adapter=adapter)
        self.redis = redis.Redis.from_url(info.redis_url)
        self.rows: list[RoundRow] = []
        self.started = time.monotonic()

    async def close(self) -> None:
        self.driver.close()
        self.redis.close()
        await self.user.close()

    async def evaluate(self, tag: str) -> Evaluation:
        print(f"\n[{tag}] the held-out questions ({len(HELDOUT_PROMPTS)} x {EVAL_SAMPLES}, "
              "seeded, never trained on) ...", flush=True)
        evaluation = await self.user.evaluate(HELDOUT_PROMPTS, EVAL_SAMPLES, tag=tag,
                                              temperature=TEMPERATURE)
        print(f"[{tag}] {evaluation.summary()}", flush=True)
        for outcome in evaluation.outcomes[::EVAL_SAMPLES * 2]:
            print(f"    {outcome.verdict.reward:+.0f}  {outcome.prompt.question!r} -> "
                  f"{outcome.answer.strip()[:70]!r}", flush=True)
        return evaluation

    def on_round(self, index: int, outcomes: list[Outcome], log: TrainingLog) -> None:
        share = injected_share(self.redis, self.info.namespace, f"train-r{index}-")
        self.rows.append(round_row(index, outcomes, log, self.started, share))
        print(format_row(self.rows[-1]), flush=True)

    async def train(self) -> TrainingLog:
        print(f"\n[learn] rounds of 16 conversations; the trainer steps once per round "
              f"(stops after {self.steps} steps). Columns: the adapter that answered, "
              "steps committed, the user's mean reward, answers meeting the preference, "
              "on topic, mean words, answers with a mined skill injected.\n" + HEADER,
              flush=True)
        self.started = time.monotonic()
        log = await self.driver.train(TRAIN_PROMPTS, steps=self.steps, on_round=self.on_round,
                                      max_rounds=self.steps * 2)
        final = log.steps[-1].version if log.steps else 0
        if final:
            await self.driver.wait_live(final, timeout=120)
        return log

    async def run(self) -> int:
        before = await self.evaluate("before")
        log = await self.train()
        after = await self.evaluate("after")
        skills = await tenant_skills(self.info)
        swaps = metric_sum(self.info.gateway_url + "/metrics", "reef_gateway_adapter_swaps_total",
                           ["ok"])
        self.report(before, after, log, skills, swaps)
        return 0 if after.mean_reward > before.mean_reward else 1

    def report(self, before: Evaluation, after: Evaluation, log: TrainingLog,
               skills: Sequence[Skill], swaps: float) -> None:
        plot_path = self.out_dir / "demo.png"
        plot(self.rows, before, after, plot_path,
             f"Reef demo: SmolLM2-135M learns 'at most {MAX_WORDS} words, on topic'",
             by_round=True)
        print("\n=== report ===")
        print(f"held-out before: {before.summary()}")
        print(f"held-out after : {after.summary()}")
        change = after.mean_reward - before.mean_reward
        verdict = "improved" if change > 0 else "did NOT improve"
        print(f"the agent {verdict}: mean reward {before.mean_reward:+.2f} -> "
              f"{after.mean_reward:+.2f} ({change:+.2f}); meets the preference "
              f"{before.hit_rate:.0%} -> {after.hit_rate:.0%}; words "
              f"{before.mean_words:.1f} -> {after.mean_words:.1f}")
        print(f"\nskills mined ({len(skills)}):")
        for skill in skills:
            credit = skill.credit
            print(f"  {skill.name} [{skill.status}, {skill.category}, v{skill.version}] "
                  f"injected into {credit.with_count} scored turns "
                  f"(mean reward {credit.with_mean:+.2f})\n    {skill.body}")
        print(f"\nweights: {log.committed} trainer steps, {len(log.steps)} adapters published "
              f"(versions {', '.join(str(s.version) for s in log.steps) or 'none'}), "
              f"{swaps:.0f} hot swaps in the gateway, {log.seconds:.0f}s of training")
        print(f"\nplot: {plot_path}\ntable and figures: {self.out_dir / 'demo.json'}")
        (self.out_dir / "demo.json").write_text(json.dumps({
            "rounds": [asdict(r) for r in self.rows],
            "steps": [asdict(s) for s in log.steps],
            "before": before.summary(), "after": after.summary(),
            "before_reward": before.mean_reward, "after_reward": after.mean_reward,
            "skills": [{"name": s.name, "status": s.status, "version": s.version,
                        "body": s.body, "injected": s.credit.with_count} for s in skills],
            "swaps": swaps}, indent=1))


def run(settings: Settings, steps: int = STEPS) -> int:
    """Start the stack under ``settings.data_dir``/demo, run the demo, stop everything."""
    started = time.monotonic()
    out_dir = Path(settings.data_dir) / "demo" / time.strftime("%Y%m%d-%H%M%S")
    data_dir = out_dir / "data"
    share_models(Path(settings.data_dir), data_dir)  # the model is converted once
    run_settings = settings.model_copy(update={
        "data_dir": data_dir, "namespace": "demo-" + uuid.uuid4().hex[:6]})
    print(f"Reef demo: {steps} trainer steps; service logs in {data_dir / 'logs'}", flush=True)
    stack = Stack(data_dir)
    try:
        info = start_stack(run_settings, stack, learning=True, skills=True,
                           env={"REEF_MAX_STEPS": str(steps)})
        demo = Demo(info, adapter_for(run_settings.adapter_name, LOCAL_TENANT), out_dir, steps)

        async def go() -> int:
            try:
                return await demo.run()
            finally:
                await demo.close()

        status = asyncio.run(go())
    except (StackError, LoopStalled) as exc:
        print(f"demo failed: {exc}", flush=True)
        return 1
    finally:
        stack.close()
    print(f"\ndemo finished in {(time.monotonic() - started) / 60:.1f} minutes")
    return status
