"""The tests' fake LLM (``tests.fake_llm.FakeLLM``) as a process of its own: the
skill-miner's LLM in a chaos or soak run. It answers every mining request with a valid,
empty proposal list after ``--latency`` seconds.

Run: ``python -m chaos.llm_server --port 8124``; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading

from tests.fake_llm import FakeLLM


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m chaos.llm_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    args = parser.parse_args()
    llm = FakeLLM(args.port)
    llm.latency = args.latency
    llm.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        llm.requests.clear()  # the fake keeps them for tests; a long run needs none
    llm.stop()


if __name__ == "__main__":
    main()
