"""Fault injection: SIGKILL a process at a random moment and start it again; and once
per run, ``reef rollback`` to an earlier adapter version.

The plan spreads ``per_kind`` faults of every kind over the load, at random points of its
progress (share of turns sent), in a shuffled order; each fault waits a random fraction
of a second more, so it lands at no particular step of a request or a batch. A process is
started again at once and not waited for, so faults overlap; it is killed again only once
it is ready. Faults still due when the load has ended run at once (before the pipeline is
left to drain).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import cast

import redis

from chaos.stack import ADAPTER, NAMESPACE, TENANT, TRAINED, Stack
from services.stack.rollback import RollbackError, kept_versions, rollback
from shared.keys import Keys
from shared.settings import Settings

KILLED = ("gateway", "scorer-1", "scorer-2", "skill-miner", "trainer", "trainer-b")
"""The processes killed with SIGKILL and restarted."""
RESTARTED = ("redis",)
"""Redis is SIGKILLed too and restarted on its append-only file."""
ROLLBACK = "rollback"
"""``reef rollback`` to the newest kept version before the live one, once per run."""
ROLLBACK_WAIT_SECONDS = 60.0
"""How long the rollback waits for the trainer to have published two versions."""


def plan(per_kind: int, kinds: tuple[str, ...], rng: random.Random) -> list[tuple[float, str]]:
    """(progress point in [0.05, 0.9], process name), in order of the points; a rollback
    (when ``kinds`` names it) once, in the middle third."""
    faults = [kind for kind in kinds if kind != ROLLBACK for _ in range(per_kind)]
    rng.shuffle(faults)
    points = sorted(rng.uniform(0.05, 0.9) for _ in faults)
    planned = list(zip(points, faults, strict=True))
    if ROLLBACK in kinds:
        planned.append((rng.uniform(0.33, 0.67), ROLLBACK))
    return sorted(planned)


class Injector:
    """Runs a plan against a stack, in a thread of its own."""

    def __init__(self, stack: Stack, faults: list[tuple[float, str]],
                 progress: Callable[[], float], rng: random.Random) -> None:
        self.stack = stack
        self.faults = faults
        self.progress = progress
        self.rng = rng
        self.counts: Counter[str] = Counter()
        self.times: list[tuple[float, str]] = []
        """When each fault was injected (Unix time), and which."""
        self.rolled_back_to: int | None = None
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
                if name == ROLLBACK:
                    self._rollback()
                    continue
                self.stack.procs[name].wait_ready()  # still starting from its last kill
                time.sleep(self.rng.uniform(0.0, 0.5))
                self.stack.restart(name, wait=False)
                self.times.append((time.time(), name))
                print(f"fault: SIGKILL {name} at {min(1.0, self.progress()):.0%} of the load, "
                      "restarted", flush=True)
                self.counts["redis_restart" if name == "redis" else f"sigkill_{name}"] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised by join() in the main thread
            self.error = exc

    def _rollback(self) -> None:
        """Roll back to the newest kept version before the live one (waiting, if need
        be, until the trainer has published two versions)."""
        client = redis.Redis.from_url(self.stack.redis_url)
        settings = Settings(profile="dev", namespace=NAMESPACE, adapter_name=ADAPTER,
                            redis_url=self.stack.redis_url)
        keys = Keys(NAMESPACE)
        deadline = time.monotonic() + ROLLBACK_WAIT_SECONDS
        try:
            while time.monotonic() < deadline:
                try:
                    live_raw = client.hget(keys.trainer(TRAINED, "state"), "live")
                    live = json.loads(cast(bytes, live_raw))["version"] if live_raw else 0
                    kept = kept_versions(client, keys, TRAINED) or set()
                    targets = sorted(v for v in kept if 0 < v < live)
                    if targets:
                        rollback(client, settings, targets[-1], tenant=TENANT)
                        self.rolled_back_to = targets[-1]
                        self.times.append((time.time(), ROLLBACK))
                        self.counts[ROLLBACK] += 1
                        print(f"fault: reef rollback {targets[-1]} (live was v{live}) at "
                              f"{min(1.0, self.progress()):.0%} of the load", flush=True)
                        return
                except (redis.RedisError, OSError, RollbackError):
                    pass  # Redis restarting, or retention moved on: try again
                time.sleep(0.5)
            self.counts["rollback_skipped"] += 1
        finally:
            client.close()
