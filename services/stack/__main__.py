"""``python -m services.stack demo|smoke|dev|chat``: Reef on this machine, no Docker needed.

``demo`` runs the whole learning loop with a scripted user and reports how the agent
improved (``services/stack/demo.py``). ``smoke`` starts Redis (a private one when none is
reachable), the embedded policy server and the gateway (with ``--loop`` also the scorer,
the trainer and the skill-miner, see ``services/stack/launch.py``); sends a few
conversations through the gateway with the official ``openai`` client; prints what was
recorded; and stops everything. ``dev`` starts the same stack and leaves it running;
``chat`` talks to a running ``dev`` stack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, cast

import openai

from services.stack import demo, rollback, skills_cli
from services.stack.launch import STATE_FILE, StackInfo, start_stack
from services.stack.openclaw import main as openclaw_main
from services.stack.procs import Stack, StackError
from shared.keys import TURNS, Keys
from shared.messages import TurnV1, decode
from shared.settings import Settings, hash_api_key

CONVERSATIONS = [
    ["What is the capital of France?", "And roughly how many people live there?"],
    ["Give me one tip for writing clear emails.", "Thanks, that helps!"],
    ["Name a primary colour."],
]


def converse(info: StackInfo, run_id: str) -> list[str]:
    """Send the scripted conversations; returns their session ids."""
    client = openai.OpenAI(base_url=info.gateway_url + "/v1", api_key=info.api_key)
    sessions = []
    for n, turns in enumerate(CONVERSATIONS):
        session = f"demo-{run_id}-{n}"
        sessions.append(session)
        messages: list[Any] = [{"role": "system", "content": "You are a helpful assistant."}]
        for i, text in enumerate(turns):
            messages.append({"role": "user", "content": text})
            headers = {"X-Session-Id": session,
                       "X-Session-Done": "true" if i == len(turns) - 1 else "false"}
            print(f"\n[{session}] user: {text}\n[{session}] assistant: ", end="", flush=True)
            reply = ""
            for chunk in client.chat.completions.create(
                    model=info.model, messages=messages, stream=True, max_tokens=60,
                    temperature=0.2, extra_headers=headers):
                if chunk.choices and chunk.choices[0].delta.content:
                    reply += chunk.choices[0].delta.content
                    print(chunk.choices[0].delta.content, end="", flush=True)
            messages.append({"role": "assistant", "content": reply})
    print()
    return sessions


def show_recorded(settings: Settings, info: StackInfo, sessions: list[str]) -> int:
    """Print the turns of ``sessions`` found in the turns stream; returns how many."""
    import redis

    client = redis.Redis.from_url(info.redis_url)
    stream = Keys(settings.namespace).stream(TURNS)
    wanted = set(sessions)
    deadline = time.monotonic() + 10
    found: list[TurnV1] = []
    while time.monotonic() < deadline:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
        found = [t for t in (decode(f) for _, f in entries)
                 if isinstance(t, TurnV1) and t.session_id in wanted]
        if len(found) >= sum(len(c) for c in CONVERSATIONS):
            break
        time.sleep(0.2)
    print(f"\nRecorded in {stream}:")
    print(f"{'session':<22} {'#':>2} {'type':<5} {'tokens':>6} {'mean logprob':>12} "
          f"{'latency':>8}  answer")
    for t in found:
        sampled = t.sampled
        n = len(sampled.token_ids) if sampled else 0
        mean = sum(sampled.logprobs) / len(sampled.logprobs) if sampled and sampled.logprobs else 0
        text = (t.response_message.get("content") or "").replace("\n", " ")[:40]
        print(f"{t.session_id:<22} {t.turn_index:>2} {t.turn_type:<5} {n:>6} {mean:>12.3f} "
              f"{t.latency_seconds:>7.2f}s  {text}")
    return len(found)


def smoke(settings: Settings, loop: bool) -> int:
    stack = Stack(settings.data_dir)
    try:
        info = start_stack(settings, stack, learning=loop, skills=loop)
        sessions = converse(info, time.strftime("%H%M%S"))
        count = show_recorded(settings, info, sessions)
    except StackError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.close()
    expected = sum(len(c) for c in CONVERSATIONS)
    print(f"\n{count}/{expected} turns recorded with token ids and logprobs, ready for the "
          "scorer and the trainer.")
    return 0 if count == expected else 1


def dev(settings: Settings, loop: bool) -> int:
    stack = Stack(settings.data_dir)
    try:
        info = start_stack(settings, stack, learning=loop, skills=loop)
        state = Path(settings.data_dir) / STATE_FILE
        state.write_text(info.to_json())
        print(f"\nReef is running. Talk to it: python -m services.stack chat   (state in {state})")
        print("Ctrl-C stops every service.")
        while all(p.poll() is None for p in stack.procs.values()):
            time.sleep(1)
        print("a service exited; see", settings.data_dir / "logs", file=sys.stderr)
        return 1
    except StackError as exc:
        print(f"dev failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.close()


def chat(settings: Settings, _loop: bool) -> int:
    state = Path(settings.data_dir) / STATE_FILE
    if not state.is_file():
        print("no running stack: start one with `make dev`", file=sys.stderr)
        return 1
    info = StackInfo.from_file(state)
    client = openai.OpenAI(base_url=info.gateway_url + "/v1", api_key=info.api_key)
    session = f"chat-{time.strftime('%Y%m%d-%H%M%S')}"
    messages: list[Any] = []
    print(f"session {session}; an empty line ends it")
    while (text := input("you> ").strip()):
        messages.append({"role": "user", "content": text})
        reply = ""
        print("reef> ", end="", flush=True)
        for chunk in client.chat.completions.create(
                model=info.model, messages=messages, stream=True,
                extra_headers={"X-Session-Id": session}):
            if chunk.choices and chunk.choices[0].delta.content:
                reply += chunk.choices[0].delta.content
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def hash_key(_: Settings, _loop: bool) -> int:
    """Print the stored form of an API key read from stdin (for REEF_API_KEYS)."""
    print(hash_api_key(sys.stdin.readline().strip()))
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Commands with arguments of their own: `reef skills ...`, `reef rollback N`.
    if argv and argv[0] == "skills":
        sys.exit(skills_cli.main(argv[1:]))
    if argv and argv[0] == "jobs":
        from services.stack import jobs_cli  # rq and the skill-miner load for this only

        sys.exit(jobs_cli.main(argv[1:]))
    if argv and argv[0] == "rollback":
        sys.exit(rollback.main(argv[1:], Settings(profile="dev")))
    if argv and argv[0] == "openclaw":
        sys.exit(openclaw_main(argv[1:], Settings(profile="dev")))
    parser = argparse.ArgumentParser(
        prog="reef", description=__doc__,
        epilog="also: reef skills --help (the skill library), reef jobs --help (exports, "
               "replays, re-mining), reef rollback N")
    commands = {"demo": None, "smoke": smoke, "dev": dev, "chat": chat, "hash-key": hash_key}
    parser.add_argument("command", choices=list(commands))
    parser.add_argument("--loop", action="store_true",
                        help="smoke/dev: also start the scorer, the trainer and the skill-miner")
    parser.add_argument("--steps", type=int, default=demo.STEPS,
                        help="demo: trainer steps (16 conversations each)")
    args = parser.parse_args(argv)
    settings = Settings(profile="dev")
    command = commands[args.command]
    sys.exit(demo.run(settings, args.steps) if command is None else command(settings, args.loop))


if __name__ == "__main__":
    main()
