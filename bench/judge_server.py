"""The fake LLM judge of the tests (``tests.fake_judge.FakeJudge``) as its own process, so
the benchmark's judge never shares an interpreter (or a GIL) with anything measured.

Run: ``python -m bench.judge_server --port 8123 --latency 0.2``; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading

from tests.fake_judge import FakeJudge


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.judge_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per answer")
    args = parser.parse_args()
    judge = FakeJudge(args.port)
    judge.latency = args.latency
    judge.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"fake judge on {judge.base_url}, {args.latency:g} s per answer", flush=True)
    while not stop.wait(1.0):
        judge.prompts.clear()  # kept by the fake for tests; a long run needs none of them
    judge.stop()


if __name__ == "__main__":
    main()
