"""Fault injection: SIGKILL a process at a random moment and start it again.

The plan spreads ``per_kind`` faults of every kind over the load, at random points of its
progress (share of turns sent), in a shuffled order; each fault waits a random fraction
of a second more, so it lands at no particular step of a request or a batch. A process is
started again at once and not waited for, so faults overlap; it is killed again only once
it is ready. Faults still due when the load has ended run at once (before the pipeline is
left to drain).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from chaos.stack import Stack

KILLED = ("gateway", "scorer-1", "scorer-2", "skill-miner", "trainer")
"""The processes killed with SIGKILL and restarted."""
RESTARTED = ("redis",)
"""Redis is SIGKILLed too and restarted on its append-only file."""


def plan(per_kind: int, kinds: tuple[str, ...], rng: random.Random) -> list[tuple[float, str]]:
    """(progress point in [0.05, 0.9], process name), in order of the points."""
    faults = [kind for kind in kinds for _ in range(per_kind)]
    rng.shuffle(faults)
    points = sorted(rng.uniform(0.05, 0.9) for _ in faults)
    return list(zip(points, faults, strict=True))


class Injector:
    """Runs a plan against a stack, in a thread of its own."""

    def __init__(self, stack: Stack, faults: list[tuple[float, str]],
                 progress: Callable[[], float], rng: random.Random) -> None:
        self.stack = stack
        self.faults = faults
        self.progress = progress
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="chaos-faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            for point, name in self.faults:
                while self.progress() < point:
                    time.sleep(0.02)
                self.stack.procs[name].wait_ready()  # still starting from its last kill
                time.sleep(self.rng.uniform(0.0, 0.5))
                self.stack.restart(name, wait=False)
                print(f"fault: SIGKILL {name} at {min(1.0, self.progress()):.0%} of the load, "
                      "restarted", flush=True)
                self.counts["redis_restart" if name == "redis" else f"sigkill_{name}"] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by join() in the main thread
            self.error = exc
