"""Learning curve: mean reward per step of the whole local loop on the scripted preference.

The stack runs as local processes (Redis, policy server, gateway, scorer, trainer; see
``services/stack/launch.py``). The scripted user (``services/stack/scripted.py``) asks the
training questions through the gateway and answers each reply with thanks or a correction;
the scorer turns those into rewards, the trainer takes a step per 16 of them and the
gateway swaps each new adapter in. Held-out questions are evaluated (seeded samples, no
feedback) before the first step and after the last.

The table has one row per round of 16 conversations: the adapter version that answered
most of them, the scripted user's mean reward, how many met the preference, stayed on
topic, and the mean answer length; and the trainer's steps committed by then. The plot
(``learning.png``) and ``learning.json`` go to the run's folder under ``var/bench/``.

Run: ``python -m bench --part learning [--learning-steps 32] [--learning-rate 5e-4]
[--learning-temperature 0.8 --learning-top-p 0.95] [--learning-seed 1234]`` (or
``python -m bench.learning`` with the same options). The seed seeds the held-out samples
and every training conversation's answer, so two runs differ only where the weights (or
the sampling options) do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from services.stack.drive import LoopDriver, TrainingLog
from services.stack.launch import LOCAL_TENANT, share_models, start_stack
from services.stack.procs import Stack
from services.stack.report import HEADER, RoundRow, format_row, plot, round_row
from services.stack.scripted import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    Outcome,
    Preference,
    ScriptedUser,
)
from shared.keys import adapter_for
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learning part")
    group.add_argument("--learning-steps", type=int, default=32, help="trainer steps")
    group.add_argument("--learning-rate", default="1e-3", help="the trainer's")
    group.add_argument("--learning-max-words", type=int, default=12, help="the scripted preference")
    group.add_argument("--learning-max-tokens", type=int, default=32, help="per training answer")
    group.add_argument("--learning-temperature", type=float, default=0.7)
    group.add_argument("--learning-top-p", type=float, default=1.0,
                       help="nucleus sampling mass of every answer (1: none)")
    group.add_argument("--learning-seed", type=int, default=1234,
                       help="seeds the held-out samples and the training conversations")
    group.add_argument("--learning-eval-samples", type=int, default=3,
                       help="seeded samples per held-out prompt, before and after")
    group.add_argument("--learning-mode", default="rl",
                       help="trainer mode (skills_only: no learning)")
    group.add_argument("--learning-gate", action=argparse.BooleanOptionalAction, default=True,
                       help="the trainer's gate on new adapters")
    group.add_argument("--learning-kl", default="0",
                       help="the trainer's kl_base_coef (KL penalty to the base model)")


async def drive(args: argparse.Namespace, out_dir: Path) -> dict[str, object]:
    # A fresh data dir (fresh adapter, logs of this run) that shares the converted model.
    data_dir = out_dir / "data"
    share_models(ROOT / "var", data_dir)
    settings = Settings(profile="dev", data_dir=data_dir,
                        namespace="bench-learn-" + uuid.uuid4().hex[:6])
    env = {"REEF_LEARNING_RATE": str(args.learning_rate),
           "REEF_MAX_STEPS": str(args.learning_steps), "REEF_MODE": args.learning_mode,
           "REEF_GATE_ENABLED": str(args.learning_gate).lower(),
           "REEF_KL_BASE_COEF": str(args.learning_kl)}
    stack = Stack(data_dir)
    try:
        info = start_stack(settings, stack, learning=True, env=env)
        user = ScriptedUser(info.gateway_url, info.api_key, info.model,
                            preference=Preference(args.learning_max_words),
                            max_tokens=args.learning_max_tokens,
                            temperature=args.learning_temperature,
                            top_p=args.learning_top_p, seed=args.learning_seed)
        driver = LoopDriver(info, user, adapter=adapter_for(settings.adapter_name, LOCAL_TENANT))
        try:
            return await _measure(args, driver, user, out_dir)
        finally:
            driver.close()
            await user.close()
    finally:
        stack.close()


async def _measure(args: argparse.Namespace, driver: LoopDriver, user: ScriptedUser,
                   out_dir: Path) -> dict[str, object]:
    before = await user.evaluate(HELDOUT_PROMPTS, args.learning_eval_samples, tag="before",
                                 seed=args.learning_seed,
                                 temperature=args.learning_temperature)
    print(f"held-out before: {before.summary()}", flush=True)
    print("\n" + HEADER, flush=True)
    rows: list[RoundRow] = []
    started = time.monotonic()

    def on_round(index: int, outcomes: list[Outcome], log: TrainingLog) -> None:
        rows.append(round_row(index, outcomes, log, started))
        print(format_row(rows[-1]), flush=True)

    log = await driver.train(TRAIN_PROMPTS, steps=args.learning_steps, on_round=on_round,
                             max_rounds=args.learning_steps * 2)
    final = log.steps[-1].version if log.steps else 0  # the newest published adapter
    if final:
        await driver.wait_live(final, timeout=120)
    after = await user.evaluate(HELDOUT_PROMPTS, args.learning_eval_samples, tag="after",
                                seed=args.learning_seed,
                                temperature=args.learning_temperature)
    print(f"\nheld-out before: {before.summary()}\nheld-out after : {after.summary()}")
    print(f"{log.committed} steps ({len(log.steps)} published) in {log.seconds:.0f}s "
          "of training")
    title = (f"SmolLM2-135M, scripted preference: <= {args.learning_max_words} words, on topic "
             f"(lr {args.learning_rate}, KL to base {args.learning_kl}, "
             f"T {args.learning_temperature}, top_p {args.learning_top_p})")
    plot(rows, before, after, out_dir / "learning.png", title)
    result: dict[str, object] = {"args": vars(args), "rounds": [asdict(r) for r in rows],
              "steps": [asdict(s) for s in log.steps],
              "before": {"mean_reward": before.mean_reward, "summary": before.summary()},
              "after": {"mean_reward": after.mean_reward, "summary": after.summary()}}
    (out_dir / "learning.json").write_text(json.dumps(result, indent=1))
    print(f"plot: {out_dir / 'learning.png'}")
    return result


def run(args: argparse.Namespace, out_dir: Path) -> None:
    """The learning part of ``python -m bench``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"reef learning curve: {args.learning_steps} steps, lr {args.learning_rate}, "
          f"temperature {args.learning_temperature}, top_p {args.learning_top_p}, seed "
          f"{args.learning_seed}, preference <= {args.learning_max_words} words on topic; "
          f"service logs in "
          f"{out_dir / 'data' / 'logs'}", flush=True)
    asyncio.run(drive(args, out_dir))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    run(args, ROOT / "var" / "bench" / time.strftime("learning-%Y%m%d-%H%M%S"))


if __name__ == "__main__":
    main()
